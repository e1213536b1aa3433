//! [`RocksLedger`]: the ledger on an embedded RocksDB.
//!
//! One column family per table; values are versioned protobuf records
//! (see `records.rs`); keys are fixed-width big-endian. A commit is one
//! RocksDB `WriteBatch`, written with `sync` so it is on disk when
//! [`Ledger::commit`] returns.

use std::path::Path;

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteOptions};

use super::{Ledger, WriteBatch, records};
use crate::{
    Error, Result,
    domain::{ChannelRecord, IntentKey, Merchant, PaymentId, PaymentRecord, PendingKey, SettlementEvent, TxIntent},
};

const CF_PAYMENTS: &str = "payments";
const CF_PENDING: &str = "pending";
const CF_MERCHANTS: &str = "merchants";
const CF_EVENTS: &str = "events";
const CF_META: &str = "meta";
const CF_CHANNELS: &str = "channels";
const CF_INTENTS: &str = "intents";
const COLUMN_FAMILIES: [&str; 7] = [CF_PAYMENTS, CF_PENDING, CF_MERCHANTS, CF_EVENTS, CF_META, CF_CHANNELS, CF_INTENTS];

const SCHEMA_KEY: &[u8] = b"schema_version";
const SCHEMA_VERSION: u32 = 1;

/// Tuning of the RocksDB ledger.
#[derive(Clone, Copy, Debug)]
pub struct RocksOptions {
    /// fsync every commit. Only benchmarks of the in-memory path turn it off.
    pub sync: bool,
}

impl Default for RocksOptions {
    fn default() -> Self {
        Self { sync: true }
    }
}

/// The ledger in a RocksDB database.
pub struct RocksLedger {
    db: DB,
    sync: bool,
}

impl std::fmt::Debug for RocksLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksLedger").field("path", &self.db.path()).field("sync", &self.sync).finish()
    }
}

impl RocksLedger {
    /// Opens (or creates) the ledger in `path`.
    pub fn open(path: impl AsRef<Path>, options: RocksOptions) -> Result<Self> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        opts.set_bytes_per_sync(1 << 20);
        let cfs = COLUMN_FAMILIES.iter().map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        let ledger = Self { db, sync: options.sync };
        ledger.check_schema()?;
        Ok(ledger)
    }

    fn check_schema(&self) -> Result<()> {
        let meta = self.cf(CF_META);
        match self.db.get_cf(meta, SCHEMA_KEY)? {
            Some(bytes) => {
                let found = u32::from_be_bytes(
                    bytes.as_slice().try_into().map_err(|_| Error::Corrupt("schema version is not 4 bytes"))?,
                );
                if found != SCHEMA_VERSION {
                    return Err(Error::Schema { found, expected: SCHEMA_VERSION });
                }
            }
            None => {
                let mut wo = WriteOptions::default();
                wo.set_sync(true);
                self.db.put_cf_opt(meta, SCHEMA_KEY, SCHEMA_VERSION.to_be_bytes(), &wo)?;
            }
        }
        Ok(())
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        self.db.cf_handle(name).expect("column families are created on open")
    }
}

impl Ledger for RocksLedger {
    fn commit(&self, batch: &WriteBatch) -> Result<()> {
        use super::Write;
        let mut wb = rocksdb::WriteBatch::default();
        for write in batch.writes() {
            match write {
                Write::Payment(p) => wb.put_cf(self.cf(CF_PAYMENTS), p.id.0, records::encode_payment(p)),
                Write::Enqueue(key) => wb.put_cf(self.cf(CF_PENDING), records::pending_key(key), []),
                Write::Dequeue(key) => wb.delete_cf(self.cf(CF_PENDING), records::pending_key(key)),
                Write::Event(e) => wb.put_cf(self.cf(CF_EVENTS), e.sequence.to_be_bytes(), records::encode_event(e)),
                Write::Merchant(m) => wb.put_cf(self.cf(CF_MERCHANTS), m.id.as_bytes(), records::encode_merchant(m)),
                Write::Intent(i) => {
                    wb.put_cf(self.cf(CF_INTENTS), records::intent_key(&i.key()), records::encode_intent(i));
                }
                Write::Channel(c) => {
                    wb.put_cf(self.cf(CF_CHANNELS), c.channel.id, records::encode_channel(c));
                }
                Write::ForgetIntent(key) => {
                    wb.delete_cf(self.cf(CF_INTENTS), records::intent_key(key));
                }
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(self.sync);
        self.db.write_opt(wb, &wo)?;
        Ok(())
    }

    fn payment(&self, id: &PaymentId) -> Result<Option<PaymentRecord>> {
        self.db.get_pinned_cf(self.cf(CF_PAYMENTS), id.0)?.map(|v| records::decode_payment(&v)).transpose()
    }

    fn for_each_payment(&self, visit: &mut dyn FnMut(PaymentRecord)) -> Result<()> {
        for item in self.db.iterator_cf(self.cf(CF_PAYMENTS), IteratorMode::Start) {
            let (_, value) = item?;
            visit(records::decode_payment(&value)?);
        }
        Ok(())
    }

    fn pending(&self) -> Result<Vec<PendingKey>> {
        self.db
            .iterator_cf(self.cf(CF_PENDING), IteratorMode::Start)
            .map(|item| records::decode_pending_key(&item?.0))
            .collect()
    }

    fn pending_head(&self, per_merchant: usize) -> Result<Vec<PendingKey>> {
        let mut out = Vec::new();
        let mut iter = self.db.raw_iterator_cf(self.cf(CF_PENDING));
        iter.seek_to_first();
        let (mut merchant, mut taken) = (None, 0);
        while let Some(bytes) = iter.key() {
            let key = records::decode_pending_key(bytes)?;
            if merchant != Some(key.merchant_number) {
                (merchant, taken) = (Some(key.merchant_number), 0);
            }
            if taken == per_merchant {
                // Skip the rest of this merchant's queue.
                match key.merchant_number.checked_add(1) {
                    Some(next) => iter.seek(next.to_be_bytes()),
                    None => break,
                }
                continue;
            }
            out.push(key);
            taken += 1;
            iter.next();
        }
        iter.status()?;
        Ok(out)
    }

    fn merchants(&self) -> Result<Vec<Merchant>> {
        self.db
            .iterator_cf(self.cf(CF_MERCHANTS), IteratorMode::Start)
            .map(|item| records::decode_merchant(&item?.1))
            .collect()
    }

    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<SettlementEvent>> {
        let Some(start) = after.checked_add(1) else { return Ok(Vec::new()) };
        let start = start.to_be_bytes();
        self.db
            .iterator_cf(self.cf(CF_EVENTS), IteratorMode::From(&start, Direction::Forward))
            .take(limit)
            .map(|item| {
                let (key, value) = item?;
                let sequence = u64::from_be_bytes(
                    key.as_ref().try_into().map_err(|_| Error::Corrupt("event key is not 8 bytes"))?,
                );
                records::decode_event(sequence, &value)
            })
            .collect()
    }

    fn intents(&self) -> Result<Vec<TxIntent>> {
        self.db
            .iterator_cf(self.cf(CF_INTENTS), IteratorMode::Start)
            .map(|item| records::decode_intent(&item?.1))
            .collect()
    }

    fn intent(&self, key: &IntentKey) -> Result<Option<TxIntent>> {
        self.db
            .get_pinned_cf(self.cf(CF_INTENTS), records::intent_key(key))?
            .map(|v| records::decode_intent(&v))
            .transpose()
    }

    fn channels(&self) -> Result<Vec<ChannelRecord>> {
        self.db
            .iterator_cf(self.cf(CF_CHANNELS), IteratorMode::Start)
            .map(|item| records::decode_channel(&item?.1))
            .collect()
    }

    fn channel(&self, id: &alloy::primitives::B256) -> Result<Option<ChannelRecord>> {
        self.db.get_pinned_cf(self.cf(CF_CHANNELS), id)?.map(|v| records::decode_channel(&v)).transpose()
    }

    fn last_event_sequence(&self) -> Result<u64> {
        match self.db.iterator_cf(self.cf(CF_EVENTS), IteratorMode::End).next() {
            Some(item) => {
                let (key, _) = item?;
                Ok(u64::from_be_bytes(key.as_ref().try_into().map_err(|_| Error::Corrupt("event key is not 8 bytes"))?))
            }
            None => Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopening_keeps_data_and_checks_schema() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ledger = RocksLedger::open(dir.path(), RocksOptions::default()).unwrap();
            let mut batch = WriteBatch::default();
            batch.push(super::super::Write::Payment(Box::new(super::super::conformance::sample_payment(1, 1))));
            ledger.commit(&batch).unwrap();
        }
        let ledger = RocksLedger::open(dir.path(), RocksOptions::default()).unwrap();
        let p = super::super::conformance::sample_payment(1, 1);
        assert_eq!(ledger.payment(&p.id).unwrap(), Some(p));
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        ledger.db.put_cf_opt(ledger.cf(CF_META), SCHEMA_KEY, 99u32.to_be_bytes(), &wo).unwrap();
        drop(ledger);
        let err = RocksLedger::open(dir.path(), RocksOptions::default()).unwrap_err();
        assert!(matches!(err, Error::Schema { found: 99, expected: 1 }), "{err}");
    }
}
