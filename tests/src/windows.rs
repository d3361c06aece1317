//! Sliding windows over verify answers: how many `VALID` answers, by their `decided_at_ms`, fall
//! in every window of a limit's duration (not only aligned ones), as the rate-limit tests check.

use serde_json::Value;

/// The sorted `decided_at_ms` of every `VALID` among `answers` (code, answer).
pub fn valid_times(answers: &[(String, Value)]) -> Vec<i64> {
    let mut times: Vec<i64> = answers
        .iter()
        .filter(|(code, _)| code == "VALID")
        .map(|(_, a)| a["decided_at_ms"].as_i64().expect("a VALID answer says when it was decided"))
        .collect();
    times.sort_unstable();
    times
}

/// How many of the sorted `times` fall in the closed window `[from, from + ms]`.
pub fn in_window(times: &[i64], from: i64, ms: i64) -> usize {
    times.partition_point(|t| *t <= from + ms) - times.partition_point(|t| *t < from)
}

/// The most and the fewest `times` in any closed window of `ms` starting in `[first, last]`
/// (every millisecond: not only aligned windows).
pub fn window_extremes(times: &[i64], first: i64, last: i64, ms: i64) -> (usize, usize) {
    (first..=last)
        .map(|from| in_window(times, from, ms))
        .fold((0, usize::MAX), |(most, fewest), n| (most.max(n), fewest.min(n)))
}
