//! A least-recently-used map bounded by the bytes its values take, not by their count: the edge
//! keeps key and root-key copies in isolate memory that every tenant shares, and one record can
//! be a hundred times the size of another.

use std::hash::Hash;

use lru::LruCache;

/// How many bytes a value takes in memory, counted generously: its own size, what it owns on
/// the heap, and the map's overhead per entry.
pub trait Weigh {
    fn weight(&self) -> usize;
}

/// The bytes a map entry costs besides its value (key, links, hash table slot), an estimate on
/// the high side.
pub const ENTRY_OVERHEAD: usize = 96;

/// A plain number kept beside its key (a version, a deadline): its own size and the 32-byte key
/// hash it is kept under.
impl Weigh for u64 {
    fn weight(&self) -> usize {
        std::mem::size_of::<u64>() + 32
    }
}

/// Heap bytes of a string, for [`Weigh`] implementations.
pub fn heap_str(text: &str) -> usize {
    text.len()
}

/// An LRU map that evicts least-recently-used entries while the total weight exceeds its
/// budget. A single value heavier than the whole budget is not kept at all.
pub struct ByteLru<K: Hash + Eq, V: Weigh> {
    entries: LruCache<K, V>,
    bytes: usize,
    budget: usize,
}

impl<K: Hash + Eq, V: Weigh> ByteLru<K, V> {
    pub fn new(budget: usize) -> ByteLru<K, V> {
        ByteLru { entries: LruCache::unbounded(), bytes: 0, budget }
    }

    /// Marks the entry as used and answers it.
    pub fn get(&mut self, key: &K) -> Option<&V> {
        self.entries.get(key)
    }

    /// Answers the entry without marking it used.
    pub fn peek(&self, key: &K) -> Option<&V> {
        self.entries.peek(key)
    }

    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains(key)
    }

    /// Inserts or replaces, then evicts least-recently-used entries until within budget.
    pub fn put(&mut self, key: K, value: V) {
        let weight = value.weight() + ENTRY_OVERHEAD;
        if weight > self.budget {
            if let Some(old) = self.entries.pop(&key) {
                self.bytes -= old.weight() + ENTRY_OVERHEAD;
            }
            return;
        }
        if let Some(old) = self.entries.put(key, value) {
            self.bytes -= old.weight() + ENTRY_OVERHEAD;
        }
        self.bytes += weight;
        while self.bytes > self.budget {
            let Some((_, evicted)) = self.entries.pop_lru() else { break };
            self.bytes -= evicted.weight() + ENTRY_OVERHEAD;
        }
    }

    /// Changes an entry in place (its weight is counted again), without marking it used.
    pub fn update(&mut self, key: &K, change: impl FnOnce(&mut V)) {
        if let Some(value) = self.entries.peek_mut(key) {
            let before = value.weight();
            change(value);
            self.bytes = self.bytes - before + value.weight();
        }
    }

    /// The weight of every entry, overhead included.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sets the budget, evicting at once if it shrank.
    pub fn set_budget(&mut self, budget: usize) {
        self.budget = budget;
        while self.bytes > self.budget {
            let Some((_, evicted)) = self.entries.pop_lru() else { break };
            self.bytes -= evicted.weight() + ENTRY_OVERHEAD;
        }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    struct Blob(usize);

    impl Weigh for Blob {
        fn weight(&self) -> usize {
            self.0
        }
    }

    #[test]
    fn evicts_least_recently_used_by_bytes() {
        let mut lru = ByteLru::new(3 * (100 + ENTRY_OVERHEAD));
        for k in 0..3 {
            lru.put(k, Blob(100));
        }
        assert_eq!(lru.len(), 3);
        lru.get(&0);
        lru.put(3, Blob(100));
        assert!(lru.contains(&0) && !lru.contains(&1), "1 was least recently used");
        lru.put(4, Blob(250));
        assert_eq!(lru.bytes(), lru.len() * ENTRY_OVERHEAD + lru_weights(&lru, &[0, 1, 2, 3, 4]));
        assert!(lru.bytes() <= 3 * (100 + ENTRY_OVERHEAD));
    }

    fn lru_weights(lru: &ByteLru<i32, Blob>, keys: &[i32]) -> usize {
        keys.iter().filter_map(|k| lru.peek(k)).map(|b| b.0).sum()
    }

    #[test]
    fn replacing_and_updating_keep_the_count_exact() {
        let mut lru = ByteLru::new(10_000);
        lru.put("a", Blob(100));
        lru.put("a", Blob(300));
        assert_eq!(lru.bytes(), 300 + ENTRY_OVERHEAD);
        lru.update(&"a", |b| b.0 = 50);
        assert_eq!(lru.bytes(), 50 + ENTRY_OVERHEAD);
        lru.update(&"missing", |b| b.0 = 1);
        assert_eq!(lru.bytes(), 50 + ENTRY_OVERHEAD);
    }

    #[test]
    fn a_value_over_the_whole_budget_is_not_kept_and_drops_its_older_copy() {
        let mut lru = ByteLru::new(1_000);
        lru.put("a", Blob(10));
        lru.put("a", Blob(5_000));
        assert!(!lru.contains(&"a"));
        assert_eq!(lru.bytes(), 0);
    }

    #[test]
    fn shrinking_the_budget_evicts_at_once() {
        let mut lru = ByteLru::new(10_000);
        for k in 0..10 {
            lru.put(k, Blob(400));
        }
        lru.set_budget(2 * (400 + ENTRY_OVERHEAD));
        assert_eq!(lru.len(), 2);
        assert!(lru.contains(&8) && lru.contains(&9));
    }
}
