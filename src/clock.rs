//! Wall-clock time as the protocols carry it: milliseconds since the Unix
//! epoch. Monotonic time for rates and timeouts is `limits::mono_ms`.

/// Now, in ms since the Unix epoch (0 for a clock before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
