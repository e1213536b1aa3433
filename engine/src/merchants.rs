//! The merchants, readable without a lock, and their API keys.

use std::{collections::HashMap, sync::Arc};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use crate::domain::Merchant;

/// SHA-256 of an API key: what the engine stores and compares.
pub(crate) fn hash_api_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

#[derive(Debug, Default)]
struct Snapshot {
    by_id: HashMap<String, Arc<Merchant>>,
    by_key: HashMap<[u8; 32], Arc<Merchant>>,
}

/// Every merchant, swapped whole on change: readers (each submit) never wait.
#[derive(Debug, Default)]
pub(crate) struct MerchantRegistry {
    snapshot: ArcSwap<Snapshot>,
}

impl MerchantRegistry {
    pub(crate) fn new(merchants: impl IntoIterator<Item = Merchant>) -> Self {
        let registry = Self::default();
        for merchant in merchants {
            registry.insert(merchant);
        }
        registry
    }

    /// The merchant whose API key is `key`.
    pub(crate) fn authenticate(&self, key: &str) -> Option<Arc<Merchant>> {
        self.snapshot.load().by_key.get(&hash_api_key(key)).cloned()
    }

    pub(crate) fn get(&self, id: &str) -> Option<Arc<Merchant>> {
        self.snapshot.load().by_id.get(id).cloned()
    }

    /// Every merchant, ordered by id.
    pub(crate) fn list(&self) -> Vec<Arc<Merchant>> {
        let mut all: Vec<_> = self.snapshot.load().by_id.values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// The next free merchant number.
    pub(crate) fn next_number(&self) -> u32 {
        self.snapshot.load().by_id.values().map(|m| m.number).max().map_or(1, |n| n + 1)
    }

    /// Inserts or replaces a merchant. Writers are serialised by the caller.
    pub(crate) fn insert(&self, merchant: Merchant) {
        let current = self.snapshot.load();
        let mut next = Snapshot { by_id: current.by_id.clone(), by_key: HashMap::new() };
        next.by_id.insert(merchant.id.clone(), Arc::new(merchant));
        for m in next.by_id.values() {
            if let Some(hash) = m.api_key_sha256 {
                next.by_key.insert(hash, m.clone());
            }
        }
        self.snapshot.store(Arc::new(next));
    }
}
