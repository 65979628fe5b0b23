//! Exact newest-first pages over a source that can only answer "the newest
//! `n` items created at or before `t`", where several items may share a
//! creation time and the source orders such ties arbitrarily (a sorted set
//! scored by ms; `ORDER BY created_at DESC LIMIT n`).
//!
//! A page ends at a (time, id) position, ids breaking ties (larger first).
//! The next page asks the source for items at or before that time and drops
//! those at that very time with an id not below the position's. When the
//! source returns a full answer, the items of its oldest time may be only
//! part of a tie group, so they are not shown; if that leaves too few
//! items, the source is asked for more. So a set that does not change while
//! a client pages is listed exactly once, without duplicates, whatever the
//! ties.

use std::future::Future;

use uuid::Uuid;

use crate::cursor::TimeCursor;
use crate::error::ApiError;

/// Largest answer asked of the source; past it (more than this many items
/// sharing one creation time) a page may end inside a tie group.
pub const MAX_FETCH: usize = 20_000;

/// Where a page starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// Items created at or before this.
    pub at_most: i64,
    /// At `at_most` itself, only ids below this one (the last shown).
    pub below_id: Option<Uuid>,
}

impl Start {
    /// After the last item of the previous page.
    pub fn after(c: TimeCursor) -> Self {
        Self {
            at_most: c.at,
            below_id: Some(c.id),
        }
    }

    /// Items created strictly before `t`.
    pub fn before(t: i64) -> Self {
        Self {
            at_most: t.saturating_sub(1),
            below_id: None,
        }
    }

    /// The newest items.
    pub fn newest() -> Self {
        Self {
            at_most: i64::MAX,
            below_id: None,
        }
    }
}

/// What one answer of the source allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled<T> {
    /// The page and where the next one starts (`None`: this is the last).
    Page(Vec<T>, Option<TimeCursor>),
    /// Not enough certain items: ask the source for this many.
    FetchMore(usize),
}

/// Builds a page of at most `limit` from `rows`, the source's answer to a
/// request for `requested` items at or before `start.at_most`; `pos` gives
/// an item's (time, id).
pub fn settle<T>(
    mut rows: Vec<T>,
    pos: impl Fn(&T) -> (i64, Uuid),
    start: &Start,
    requested: usize,
    limit: usize,
) -> Settled<T> {
    let full = rows.len() >= requested && requested < MAX_FETCH;
    let oldest = rows.iter().map(|r| pos(r).0).min();
    rows.sort_by_key(|r| std::cmp::Reverse(pos(r)));
    rows.retain(|r| {
        let (at, id) = pos(r);
        at < start.at_most || (at == start.at_most && start.below_id.is_none_or(|below| id < below))
    });
    if full {
        // The oldest time's items may be part of a larger tie group.
        if let Some(oldest) = oldest {
            rows.retain(|r| pos(r).0 > oldest);
        }
        if rows.len() < limit {
            return Settled::FetchMore((requested * 2).min(MAX_FETCH));
        }
        rows.truncate(limit);
        let next = rows.last().map(|r| {
            let (at, id) = pos(r);
            TimeCursor { at, id }
        });
        return Settled::Page(rows, next);
    }
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = more.then(|| rows.last()).flatten().map(|r| {
        let (at, id) = pos(r);
        TimeCursor { at, id }
    });
    Settled::Page(rows, next)
}

/// Fetches and settles until a page is certain. `fetch(at_most, n)` asks
/// the source for its newest `n` items created at or before `at_most`.
pub async fn page<T, F, Fut>(
    start: Start,
    limit: usize,
    pos: impl Fn(&T) -> (i64, Uuid),
    mut fetch: F,
) -> Result<(Vec<T>, Option<TimeCursor>), ApiError>
where
    F: FnMut(i64, usize) -> Fut,
    Fut: Future<Output = Result<Vec<T>, ApiError>>,
{
    // The previous page's last item comes back once, plus one to see
    // whether more follow.
    let mut requested = (limit + 2).min(MAX_FETCH);
    loop {
        let rows = fetch(start.at_most, requested).await?;
        match settle(rows, &pos, &start, requested, limit) {
            Settled::Page(items, next) => return Ok((items, next)),
            Settled::FetchMore(n) => requested = n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source with arbitrary tie order: it sorts by time only and, within
    /// a time, by a scrambled id.
    fn source(items: &[(i64, Uuid)], at_most: i64, n: usize) -> Vec<(i64, Uuid)> {
        let mut v: Vec<_> = items.iter().copied().filter(|i| i.0 <= at_most).collect();
        v.sort_by_key(|&(t, id)| {
            (
                std::cmp::Reverse(t),
                id.as_u128().wrapping_mul(0x9e37_79b9_7f4a_7c15),
            )
        });
        v.truncate(n);
        v
    }

    fn walk(items: &[(i64, Uuid)], limit: usize) -> Vec<(i64, Uuid)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let mut seen = Vec::new();
        let mut start = Start::newest();
        let mut pages = 0;
        loop {
            let (page, next) = rt
                .block_on(page(
                    start,
                    limit,
                    |r: &(i64, Uuid)| *r,
                    |at, n| {
                        let rows = source(items, at, n);
                        async move { Ok(rows) }
                    },
                ))
                .expect("page");
            assert!(page.len() <= limit);
            seen.extend(page);
            pages += 1;
            assert!(pages <= items.len() + 2, "no progress");
            match next {
                Some(c) => start = Start::after(c),
                None => return seen,
            }
        }
    }

    #[test]
    fn pages_through_ties_exactly_once_in_order() {
        // 3 items at t=1, 40 at t=2 (a big tie group), singles, 5 at t=9.
        let mut items = Vec::new();
        let mut id = 0u128;
        for (t, k) in [(1, 3), (2, 40), (3, 1), (4, 1), (5, 1), (9, 5)] {
            for _ in 0..k {
                id += 1;
                items.push((t, Uuid::from_u128(id)));
            }
        }
        let mut expected = items.clone();
        expected.sort_by(|a, b| b.cmp(a));
        for limit in [1, 2, 3, 7, 50, 100] {
            assert_eq!(walk(&items, limit), expected, "limit {limit}");
        }
        assert!(walk(&[], 5).is_empty());
    }

    #[test]
    fn before_excludes_its_instant() {
        let items = [(5, Uuid::from_u128(1)), (4, Uuid::from_u128(2))];
        let start = Start::before(5);
        let rows = source(&items, start.at_most, 10);
        assert_eq!(
            settle(rows, |r| *r, &start, 10, 10),
            Settled::Page(vec![(4, Uuid::from_u128(2))], None)
        );
    }

    #[test]
    fn a_full_answer_of_one_tie_group_asks_for_more() {
        let rows: Vec<(i64, Uuid)> = (0..4).map(|i| (7, Uuid::from_u128(i))).collect();
        assert_eq!(
            settle(rows, |r| *r, &Start::newest(), 4, 2),
            Settled::FetchMore(8)
        );
    }
}
