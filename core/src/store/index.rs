//! An open-addressing hash index over a table of slots that the caller owns (the glue keeps it in
//! nginx shared memory), keyed by a `u64` and unique per key.
//!
//! A key's home slot is `key & (len - 1)`; an entry sits at its home or after it (linear
//! probing, wrapping at the end of the table), with no empty slot in between. Deletion shifts the
//! later entries of the probe run back into the hole (backward-shift deletion), so there are no
//! tombstones and a lookup stops at the first empty slot. Kept at most [`max_entries`] full, a
//! lookup reads one or two slots whatever the number of entries.
//!
//! The table's length should be a power of two: other lengths stay correct but leave some slots
//! that are nobody's home. Nothing here allocates or panics; a full table only makes probing
//! visit every slot.

/// One slot of the index; `value` `None` is an empty slot. With a pointer-like `V` such as
/// `NonNull<T>`, `Option<V>` is as large as `V` (the empty slot is a null pointer).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot<V> {
    pub key: u64,
    pub value: Option<V>,
}

impl<V> Slot<V> {
    pub const EMPTY: Slot<V> = Slot { key: 0, value: None };
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("key is already in the index")]
    Exists,
    #[error("index is full")]
    Full,
}

/// The most entries a table of `len` slots should hold: three quarters, which keeps probe runs
/// short.
pub const fn max_entries(len: usize) -> usize {
    len / 4 * 3
}

/// The value stored under `key`.
pub fn find<V: Copy>(slots: &[Slot<V>], key: u64) -> Option<V> {
    position(slots, key).and_then(|at| slots[at].value)
}

/// Stores `value` under `key` in the first empty slot of the key's probe run.
pub fn insert<V: Copy>(slots: &mut [Slot<V>], key: u64, value: V) -> Result<(), IndexError> {
    let len = slots.len();
    let Some(mut at) = home(len, key) else {
        return Err(IndexError::Full);
    };
    for _ in 0..len {
        let slot = &mut slots[at];
        if slot.value.is_none() {
            *slot = Slot { key, value: Some(value) };
            return Ok(());
        }
        if slot.key == key {
            return Err(IndexError::Exists);
        }
        at = next(at, len);
    }
    Err(IndexError::Full)
}

/// Removes the entry of `key` and returns its value. Each later entry of the probe run moves
/// back into the hole unless its home lies after the hole (cyclically), where it must stay.
pub fn remove<V: Copy>(slots: &mut [Slot<V>], key: u64) -> Option<V> {
    let len = slots.len();
    let mut hole = position(slots, key)?;
    let removed = slots[hole].value;
    let mut at = hole;
    for _ in 1..len {
        at = next(at, len);
        let slot = slots[at];
        if slot.value.is_none() {
            break;
        }
        let Some(slot_home) = home(len, slot.key) else { break };
        if !cyclically_within(slot_home, hole, at) {
            slots[hole] = slot;
            hole = at;
        }
    }
    slots[hole] = Slot::EMPTY;
    removed
}

/// Where the entry of `key` is.
fn position<V>(slots: &[Slot<V>], key: u64) -> Option<usize> {
    let len = slots.len();
    let mut at = home(len, key)?;
    for _ in 0..len {
        let slot = &slots[at];
        slot.value.as_ref()?;
        if slot.key == key {
            return Some(at);
        }
        at = next(at, len);
    }
    None
}

/// The first slot probed for `key`; `None` for a table without slots.
fn home(len: usize, key: u64) -> Option<usize> {
    let mask = len.checked_sub(1)?;
    Some(key as usize & mask)
}

fn next(at: usize, len: usize) -> usize {
    if at + 1 == len {
        0
    } else {
        at + 1
    }
}

/// Whether `slot` lies in the cyclic range `(after, upto]`.
fn cyclically_within(slot: usize, after: usize, upto: usize) -> bool {
    if after <= upto {
        after < slot && slot <= upto
    } else {
        after < slot || slot <= upto
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn table(len: usize) -> Vec<Slot<usize>> {
        vec![Slot::EMPTY; len]
    }

    /// Keys of the table (slot by slot, `None` for empty), to check exact placement.
    fn layout(slots: &[Slot<usize>]) -> Vec<Option<u64>> {
        slots.iter().map(|s| s.value.map(|_| s.key)).collect()
    }

    #[test]
    fn inserted_keys_are_found() {
        let mut slots = table(16);
        assert_eq!(find(&slots, 7), None);
        for key in [7u64, 1 << 40, 123_456_789, u64::MAX] {
            insert(&mut slots, key, key as usize ^ 1).unwrap();
        }
        for key in [7u64, 1 << 40, 123_456_789, u64::MAX] {
            assert_eq!(find(&slots, key), Some(key as usize ^ 1));
        }
        assert_eq!(find(&slots, 8), None);
        assert_eq!(insert(&mut slots, 7, 0), Err(IndexError::Exists));
        assert_eq!(find(&slots, 7), Some(6), "a refused insert leaves the entry");
    }

    #[test]
    fn colliding_keys_probe_forward() {
        let mut slots = table(16);
        for key in [3, 19, 35] {
            insert(&mut slots, key, 0).unwrap();
        }
        assert_eq!(&layout(&slots)[3..7], &[Some(3), Some(19), Some(35), None]);
        assert_eq!(find(&slots, 51), None, "same home, not stored");
    }

    #[test]
    fn delete_in_the_middle_of_a_run_shifts_later_entries_back() {
        let mut slots = table(16);
        // 3, 19 and 35 are at home 3; 5 is at its home inside the run.
        for key in [3, 19, 5, 35] {
            insert(&mut slots, key, key as usize).unwrap();
        }
        assert_eq!(&layout(&slots)[3..8], &[Some(3), Some(19), Some(5), Some(35), None]);
        assert_eq!(remove(&mut slots, 19), Some(19));
        // 35 moves back into the hole; 5 stays at its home.
        assert_eq!(&layout(&slots)[3..8], &[Some(3), Some(35), Some(5), None, None]);
        assert_eq!(remove(&mut slots, 3), Some(3));
        assert_eq!(&layout(&slots)[3..8], &[Some(35), None, Some(5), None, None]);
        for key in [35, 5] {
            assert_eq!(find(&slots, key), Some(key as usize));
        }
        assert_eq!(find(&slots, 19), None);
        assert_eq!(remove(&mut slots, 19), None, "removing a missing key changes nothing");
        assert_eq!(&layout(&slots)[3..8], &[Some(35), None, Some(5), None, None]);
    }

    #[test]
    fn probe_runs_wrap_at_the_end_of_the_table() {
        let mut slots = table(8);
        // 14 is at home 6, 22 and 30 share it and wrap to 7 and 0; 8's home is 0, taken: slot 1.
        for key in [14, 22, 30, 8] {
            insert(&mut slots, key, key as usize).unwrap();
        }
        let expected = [Some(30), Some(8), None, None, None, None, Some(14), Some(22)];
        assert_eq!(layout(&slots), expected);
        for key in [14, 22, 30, 8] {
            assert_eq!(find(&slots, key), Some(key as usize));
        }
        assert_eq!(remove(&mut slots, 22), Some(22));
        // 30 moves back across the end; 8 moves into its home.
        let expected = [Some(8), None, None, None, None, None, Some(14), Some(30)];
        assert_eq!(layout(&slots), expected);
    }

    #[test]
    fn entry_at_its_home_past_the_end_stays() {
        let mut slots = table(8);
        // 6 at home 6, 14 wraps from home 6 to 7, 0 is at its home 0.
        for key in [6, 14, 0] {
            insert(&mut slots, key, key as usize).unwrap();
        }
        assert_eq!(remove(&mut slots, 6), Some(6));
        let expected = [Some(0), None, None, None, None, None, Some(14), None];
        assert_eq!(layout(&slots), expected);
        assert_eq!(find(&slots, 0), Some(0));
        assert_eq!(find(&slots, 14), Some(14));
    }

    #[test]
    fn table_at_its_three_quarter_cap() {
        let len = 64;
        let cap = max_entries(len);
        assert_eq!(cap, 48);
        let mut slots = table(len);
        // The worst case: every key has the same home, one run of 48 slots across the end.
        let keys: Vec<u64> = (0..cap as u64).map(|i| 40 + i * 64).collect();
        for (i, key) in keys.iter().enumerate() {
            insert(&mut slots, *key, i).unwrap();
        }
        assert_eq!(slots.iter().filter(|s| s.value.is_some()).count(), cap);
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(find(&slots, *key), Some(i));
        }
        assert_eq!(find(&slots, 40 + 64 * 1000), None);
        assert_eq!(find(&slots, 39), None);
        for (i, key) in keys.iter().enumerate().rev().step_by(2) {
            assert_eq!(remove(&mut slots, *key), Some(i));
        }
        for (i, key) in keys.iter().enumerate() {
            let expected = (i % 2 == 0).then_some(i);
            assert_eq!(find(&slots, *key), expected, "key {key}");
        }
    }

    #[test]
    fn full_and_empty_tables_terminate() {
        let mut slots = table(8);
        for key in 0..8 {
            insert(&mut slots, key * 3, key as usize).unwrap();
        }
        assert_eq!(insert(&mut slots, 100, 0), Err(IndexError::Full));
        assert_eq!(find(&slots, 100), None);
        assert_eq!(remove(&mut slots, 100), None);
        assert_eq!(remove(&mut slots, 9), Some(3));
        for key in (0..8).filter(|k| *k != 3) {
            assert_eq!(find(&slots, key * 3), Some(key as usize));
        }
        let mut none: Vec<Slot<usize>> = Vec::new();
        assert_eq!(find(&none, 1), None);
        assert_eq!(insert(&mut none, 1, 1), Err(IndexError::Full));
        assert_eq!(remove(&mut none, 1), None);
    }

    #[test]
    fn empty_slot_of_a_pointer_value_is_a_null_pointer() {
        use core::ptr::NonNull;
        assert_eq!(size_of::<Option<NonNull<u8>>>(), size_of::<*mut u8>());
        #[cfg(target_pointer_width = "64")]
        assert_eq!(size_of::<Slot<NonNull<u8>>>(), 16);
    }

    /// Random inserts, removes and finds against a HashMap, with keys that crowd few homes.
    #[test]
    fn random_operations_match_a_hashmap() {
        // xorshift: deterministic, no dependency.
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for (len, fill) in [(64, max_entries(64)), (16, 16), (12, 12), (1, 1)] {
            let mut slots = table(len);
            let mut model: HashMap<u64, usize> = HashMap::new();
            let keys: Vec<u64> = (0..3 * len as u64).map(|_| next() % (8 * len as u64)).collect();
            for step in 0..20_000 {
                let key = keys[(next() % keys.len() as u64) as usize];
                match next() % 3 {
                    0 if model.contains_key(&key) => {
                        assert_eq!(insert(&mut slots, key, step), Err(IndexError::Exists));
                    }
                    0 if model.len() < fill => {
                        assert_eq!(insert(&mut slots, key, step), Ok(()));
                        model.insert(key, step);
                    }
                    0 if fill == len => {
                        assert_eq!(insert(&mut slots, key, step), Err(IndexError::Full));
                    }
                    1 => assert_eq!(remove(&mut slots, key), model.remove(&key)),
                    _ => assert_eq!(find(&slots, key), model.get(&key).copied()),
                }
                if step % 97 == 0 {
                    for key in &keys {
                        assert_eq!(find(&slots, *key), model.get(key).copied(), "len {len}");
                    }
                    let stored = slots.iter().filter(|s| s.value.is_some()).count();
                    assert_eq!(stored, model.len());
                }
            }
        }
    }
}
