//! What an Azure OpenAI `api-version` accepts (SPEC §13). Azure answers 400 "Unrecognized
//! request argument supplied: stream_options" to versions before `2024-09-01-preview`
//! (`2024-02-01`, `2024-06-01`, …), so the gateway adds `stream_options.include_usage` only for
//! versions from that one on, and always for `/openai/v1` (which has no dated versions).

/// The first dated version that accepts `stream_options` (a preview counts from its date:
/// `2024-09-01-preview` and `2024-09-01` both accept it).
const STREAM_OPTIONS_SINCE: (u16, u8, u8) = (2024, 9, 1);

/// Whether the upstream request may carry `stream_options`: always on `/openai/v1` (`v1`),
/// else by the query's `api-version`. A version that is not a date (`preview`, `latest`, none)
/// is taken to be current.
pub fn accepts_stream_options(v1: bool, query: Option<&str>) -> bool {
    if v1 {
        return true;
    }
    match query.and_then(api_version).and_then(version_date) {
        Some(date) => date >= STREAM_OPTIONS_SINCE,
        None => true,
    }
}

/// The value of the query's (first) `api-version` parameter.
fn api_version(query: &str) -> Option<&str> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("api-version="))
}

/// `YYYY-MM-DD` with an optional `-suffix` (`-preview`, `-preview.1`): the date.
fn version_date(v: &str) -> Option<(u16, u8, u8)> {
    let b = v.as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' || (b.len() > 10 && b[10] != b'-') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u16> {
        let s = &v[r];
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())
            .flatten()
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    Some((y, m as u8, d as u8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_options_by_version() {
        for (v1, query, want) in [
            // Versions Azure refuses `stream_options` for.
            (false, Some("api-version=2024-02-01"), false),
            (false, Some("api-version=2024-06-01"), false),
            (false, Some("api-version=2023-05-15"), false),
            (false, Some("api-version=2024-02-15-preview"), false),
            (false, Some("api-version=2024-08-01-preview"), false),
            (false, Some("api-version=2024-07-01-preview"), false),
            // From 2024-09-01-preview on.
            (false, Some("api-version=2024-09-01-preview"), true),
            (false, Some("api-version=2024-10-21"), true),
            (false, Some("api-version=2024-10-01-preview"), true),
            (false, Some("api-version=2025-04-01-preview"), true),
            (false, Some("api-version=2024-12-01-preview.1"), true),
            (false, Some("x=1&api-version=2024-06-01&y=2"), false),
            (false, Some("x=1&api-version=2024-10-21"), true),
            // Not a date: taken to be current.
            (false, Some("api-version=preview"), true),
            (false, Some("api-version=latest"), true),
            (false, Some("api-version="), true),
            (false, Some("api-version=2024-6-01"), true),
            (false, Some("api-version=2024-13-01"), true),
            (false, Some("api-version=2024-06-01x"), true),
            (false, Some("api-version=+024-06-01"), true),
            (false, Some("my-api-version=2024-02-01"), true),
            (false, None, true),
            // `/openai/v1` always.
            (true, Some("api-version=2024-02-01"), true),
            (true, None, true),
        ] {
            assert_eq!(accepts_stream_options(v1, query), want, "{v1} {query:?}");
        }
    }
}
