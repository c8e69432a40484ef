//! Sizes as people type them, one grammar for every flag and request that takes one
//! (`run --memory`, `exec --memory`, `pool add-host --memory/--disk`, `schedule`, the
//! agent's `memory`): a number, whole or decimal (`4096`, `1.5`), then an optional
//! unit `B`, `K`, `M`, `G` or `T` (also `KB`/`KiB`, ...; any case), all powers of
//! 1024. A bare number is in the caller's unit (MiB for memory, GiB for disk). The
//! result must be a whole number of that unit: `1.5G` is 1536 MiB, `1500K` is not a
//! whole MiB. Computed exactly (integers, no floating point), so `0.1G` is refused
//! rather than rounded.

/// Why a size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a number with an optional unit.
    #[error("expected a number with an optional unit K, M, G or T (powers of 1024)")]
    Syntax,
    /// A unit this grammar does not know.
    #[error("unknown unit {0:?}; use K, M, G or T (powers of 1024)")]
    Unit(String),
    /// Zero or negative.
    #[error("must be greater than zero")]
    NotPositive,
    /// Not a whole number of the unit asked for.
    #[error("must be a whole number of {0}")]
    Fraction(&'static str),
    /// More than 2^63 - 1 units.
    #[error("too large")]
    TooLarge,
}

/// Parses `text` into whole units of 2^`unit_shift` bytes (20: MiB, 30: GiB).
pub fn parse_size(text: &str, unit_shift: u32) -> Result<u64, SizeError> {
    let t = text.trim();
    if t.starts_with('-') && t[1..].starts_with(|c: char| c.is_ascii_digit() || c == '.') {
        return Err(SizeError::NotPositive);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" => unit_shift,
        "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ if number.is_empty() => return Err(SizeError::Syntax),
        other => return Err(SizeError::Unit(other.to_string())),
    };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && frac.is_empty() || frac.contains('.') || frac.len() > 18 {
        return Err(SizeError::Syntax);
    }
    let digits = |s: &str| -> Result<u128, SizeError> {
        if s.is_empty() {
            return Ok(0);
        }
        s.parse::<u128>().map_err(|_| SizeError::TooLarge)
    };
    // value = (whole + frac / 10^len) * 2^shift bytes, in units of 2^unit_shift:
    // numerator / (10^len * 2^unit_shift), exact in u128 for any size that fits.
    let scale = 10u128.pow(frac.len() as u32);
    let whole = digits(whole)?;
    if whole >= 1 << 64 {
        return Err(SizeError::TooLarge);
    }
    let numerator = (whole * scale + digits(frac)?)
        .checked_mul(1 << shift)
        .ok_or(SizeError::TooLarge)?;
    let denominator = scale << unit_shift;
    if numerator == 0 {
        return Err(SizeError::NotPositive);
    }
    if numerator % denominator != 0 {
        return Err(SizeError::Fraction(match unit_shift {
            30 => "GiB",
            20 => "MiB",
            _ => "units",
        }));
    }
    u64::try_from(numerator / denominator)
        .ok()
        .filter(|&v| v <= i64::MAX as u64)
        .ok_or(SizeError::TooLarge)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_and_decimal_sizes_in_any_unit() {
        let mib = |s| parse_size(s, 20);
        assert_eq!(mib("512"), Ok(512));
        assert_eq!(mib("512M"), Ok(512));
        assert_eq!(mib(" 2g "), Ok(2048));
        assert_eq!(mib("1.5G"), Ok(1536));
        assert_eq!(mib("5GiB"), Ok(5120));
        assert_eq!(mib("65536k"), Ok(64));
        assert_eq!(mib("1048576B"), Ok(1));
        assert_eq!(mib("0.5T"), Ok(512 * 1024));
        assert_eq!(mib(".5G"), Ok(512));
        assert_eq!(parse_size("1.5T", 30), Ok(1536));
        assert_eq!(parse_size("20", 30), Ok(20));
    }

    #[test]
    fn bad_sizes_say_why() {
        let mib = |s| parse_size(s, 20);
        assert_eq!(mib("1500k"), Err(SizeError::Fraction("MiB")));
        assert_eq!(mib("0.1G"), Err(SizeError::Fraction("MiB")));
        assert_eq!(mib("0"), Err(SizeError::NotPositive));
        assert_eq!(mib("0.0G"), Err(SizeError::NotPositive));
        assert_eq!(mib("-5M"), Err(SizeError::NotPositive));
        assert_eq!(mib("-"), Err(SizeError::Syntax));
        assert_eq!(mib("lots"), Err(SizeError::Syntax));
        assert_eq!(mib(""), Err(SizeError::Syntax));
        assert_eq!(mib("."), Err(SizeError::Syntax));
        assert_eq!(mib("1.2.3G"), Err(SizeError::Syntax));
        assert_eq!(mib("5X"), Err(SizeError::Unit("X".into())));
        assert_eq!(mib("99999999999999999999G"), Err(SizeError::TooLarge));
        assert_eq!(
            mib("9999999999999999999999999999999999999999"),
            Err(SizeError::TooLarge)
        );
    }
}
