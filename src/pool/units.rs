//! Sizes as people type them: `4096` (in the default unit), `4G`, `512MiB`, `1.5T`.

use super::PoolError;

/// Parses a size into whole units of 2^`unit_shift` bytes (20 for MiB, 30 for GiB),
/// with the one grammar of [`crate::units`]. Refuses zero, negatives and fractions of
/// a unit.
pub fn parse_size(text: &str, unit_shift: u32) -> Result<u64, PoolError> {
    crate::units::parse_size(text, unit_shift)
        .map_err(|why| PoolError::Invalid(format!("size {text:?}: {why}")))
}

/// Parses a reserved amount: like [`parse_size`], but zero (`0`, `0G`) is allowed, since
/// "keep nothing back for the host" is a valid choice.
pub fn parse_reserved(text: &str, unit_shift: u32) -> Result<u64, PoolError> {
    let number = text
        .trim()
        .trim_end_matches(|c: char| c.is_ascii_alphabetic());
    if number.trim().parse::<f64>() == Ok(0.0) {
        return Ok(0);
    }
    parse_size(text, unit_shift)
}

/// Parses a memory size into MiB.
pub fn parse_mib(text: &str) -> Result<u64, PoolError> {
    parse_size(text, 20)
}

/// Parses a disk size into GiB.
pub fn parse_gib(text: &str) -> Result<u64, PoolError> {
    parse_size(text, 30)
}

/// Parses a ratio, a cost or another positive real number.
pub fn parse_positive(what: &str, text: &str) -> Result<f64, PoolError> {
    match text.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(PoolError::Invalid(format!(
            "{what} must be a number above 0, got {text:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_may_be_zero_but_not_negative() {
        assert_eq!(parse_reserved("0", 20).unwrap(), 0);
        assert_eq!(parse_reserved("0G", 30).unwrap(), 0);
        assert_eq!(parse_reserved("2G", 20).unwrap(), 2048);
        assert!(parse_reserved("-1G", 20).is_err());
        assert!(parse_size("0", 20).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_mib("4096").ok(), Some(4096));
        assert_eq!(parse_mib("4G").ok(), Some(4096));
        assert_eq!(parse_mib("1.5GiB").ok(), Some(1536));
        assert_eq!(parse_gib("2T").ok(), Some(2048));
        assert_eq!(parse_gib("20").ok(), Some(20));
        for bad in ["0", "-1", "-4G", "", "abc", "1.5", "512K", "3X", "nan"] {
            assert!(parse_mib(bad).is_err(), "{bad} accepted");
        }
        assert!(parse_gib("1.5").is_err());
        assert!(parse_gib("512M").is_err());
    }
}
