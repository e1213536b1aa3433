//! [`RocksLedger`]: the ledger on an embedded RocksDB.
//!
//! One column family per table; values are versioned protobuf records
//! (see `records.rs`); keys are fixed-width big-endian. A commit is one
//! RocksDB `WriteBatch`, written with `sync` so it is on disk when
//! [`Ledger::commit`] returns.
//!
//! A failed write (a full disk, an I/O error) leaves RocksDB refusing
//! every later write, even once the disk has room again. So after one the
//! database is closed, and the next commit opens it again (replaying its
//! log) before writing: when space is back, the ledger resumes by itself.
//! Reads wait while it is reopened and fail while it is closed.

use std::{
    ops::Deref,
    path::{Path, PathBuf},
    sync::{
        PoisonError, RwLock, RwLockReadGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use alloy::primitives::B256;
use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteOptions};

use super::{Ledger, Pruned, WriteBatch, records};
use crate::{
    Error, Result,
    domain::{ChannelRecord, IntentKey, Merchant, PaymentId, PaymentRecord, PendingKey, SettlementEvent, TxIntent},
};

/// A RocksDB failure, as the ledger's storage error: callers of the
/// [`Ledger`] trait see a storage failure, not the database underneath.
impl From<rocksdb::Error> for Error {
    fn from(e: rocksdb::Error) -> Self {
        Self::Storage(format!("rocksdb: {e}"))
    }
}

const CF_PAYMENTS: &str = "payments";
const CF_PENDING: &str = "pending";
const CF_MERCHANTS: &str = "merchants";
const CF_EVENTS: &str = "events";
const CF_META: &str = "meta";
const CF_CHANNELS: &str = "channels";
const CF_INTENTS: &str = "intents";
/// Payments by `validBefore`: key `validBefore (8 bytes) ‖ id`, no value.
/// Start-up reads the recent ones, retention deletes the old ones, and
/// neither goes over the rest.
const CF_BY_VALID_BEFORE: &str = "payments_by_valid_before";
/// Events by merchant: key `merchant number (4 bytes) ‖ sequence`, no
/// value. `WatchSettlements` reads one merchant's events through it.
const CF_EVENTS_BY_MERCHANT: &str = "events_by_merchant";
/// Channels by merchant: key `merchant id ‖ '/' ‖ channel id`, no value
/// (`/` is not allowed in merchant ids). `ListChannels` reads through it.
const CF_CHANNELS_BY_MERCHANT: &str = "channels_by_merchant";
/// Ids of the payments retention deleted (no value): their nonces stay spent.
const CF_PRUNED: &str = "pruned_payments";
/// Payments by a settlement transaction: `tx ++ payment id`, empty values.
/// Every transaction a payment's status named is kept (a fee bump's
/// earlier versions too), so a lookup by any of them finds it.
const CF_PAYMENTS_BY_TX: &str = "payments_by_transaction";
const COLUMN_FAMILIES: [&str; 12] = [
    CF_PRUNED,
    CF_PAYMENTS,
    CF_PENDING,
    CF_MERCHANTS,
    CF_EVENTS,
    CF_META,
    CF_CHANNELS,
    CF_INTENTS,
    CF_BY_VALID_BEFORE,
    CF_EVENTS_BY_MERCHANT,
    CF_CHANNELS_BY_MERCHANT,
    CF_PAYMENTS_BY_TX,
];

/// Set once every payment, event and channel is in the indexes above (a
/// ledger written before them is indexed once, when first opened).
const INDEXED_KEY: &[u8] = b"indexes_built_v1";
/// Set once [`CF_PAYMENTS_BY_TX`] was built for the payments written before it.
const TX_INDEXED_KEY: &[u8] = b"indexes_built_v2_transactions";

fn by_tx_key(tx: &B256, id: &PaymentId) -> [u8; 64] {
    let mut key = [0u8; 64];
    key[..32].copy_from_slice(tx.as_slice());
    key[32..].copy_from_slice(id.0.as_slice());
    key
}

fn merchant_event_key(merchant_number: u32, sequence: u64) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..4].copy_from_slice(&merchant_number.to_be_bytes());
    key[4..].copy_from_slice(&sequence.to_be_bytes());
    key
}

fn merchant_channel_prefix(merchant_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(merchant_id.len() + 33);
    key.extend_from_slice(merchant_id.as_bytes());
    key.push(b'/');
    key
}

fn merchant_channel_key(c: &ChannelRecord) -> Vec<u8> {
    let mut key = merchant_channel_prefix(&c.merchant_id);
    key.extend_from_slice(c.channel.id.as_slice());
    key
}

/// Payments deleted (or indexed) per write batch.
const CHUNK: usize = 1024;

fn by_valid_before_key(p: &PaymentRecord) -> [u8; 40] {
    let mut key = [0u8; 40];
    key[..8].copy_from_slice(&p.authorization.valid_before_secs().to_be_bytes());
    key[8..].copy_from_slice(p.id.0.as_slice());
    key
}

fn decode_by_valid_before(key: &[u8]) -> Result<(u64, PaymentId)> {
    if key.len() != 40 {
        return Err(Error::Corrupt("validBefore index key is not 40 bytes"));
    }
    let valid_before = u64::from_be_bytes(key[..8].try_into().expect("8 bytes"));
    Ok((valid_before, PaymentId(alloy::primitives::B256::from_slice(&key[8..]))))
}

const SCHEMA_KEY: &[u8] = b"schema_version";

/// After a failed write, how often the database is reopened at most.
const REOPEN_EVERY: Duration = Duration::from_secs(1);
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
    path: PathBuf,
    /// `None` while closed after a failed write.
    db: RwLock<Option<DB>>,
    sync: bool,
    /// A write failed: the next commit reopens the database first.
    failed: AtomicBool,
    /// No reopen is tried before this (each replays the log).
    next_reopen: std::sync::Mutex<Instant>,
    /// Retention has deleted payments (so [`Ledger::pruned`] has to look).
    has_pruned: AtomicBool,
}

impl std::fmt::Debug for RocksLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksLedger").field("path", &self.path).field("sync", &self.sync).finish()
    }
}

/// The open database, read-locked: a reopen waits for it.
struct Open<'a>(RwLockReadGuard<'a, Option<DB>>);

impl Deref for Open<'_> {
    type Target = DB;

    fn deref(&self) -> &DB {
        self.0.as_ref().expect("checked open")
    }
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a ColumnFamily {
    db.cf_handle(name).expect("column families are created on open")
}

impl RocksLedger {
    /// Opens (or creates) the ledger in `path`.
    pub fn open(path: impl AsRef<Path>, options: RocksOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let db = Self::open_db(&path)?;
        let has_pruned = db.iterator_cf(cf(&db, CF_PRUNED), IteratorMode::Start).next().is_some();
        Ok(Self {
            has_pruned: AtomicBool::new(has_pruned),
            path,
            db: RwLock::new(Some(db)),
            sync: options.sync,
            failed: AtomicBool::new(false),
            next_reopen: std::sync::Mutex::new(Instant::now()),
        })
    }

    fn open_db(path: &Path) -> Result<DB> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        opts.set_bytes_per_sync(1 << 20);
        let cfs = COLUMN_FAMILIES.iter().map(|&name| {
            let mut cf_opts = Options::default();
            if name == CF_PAYMENTS || name == CF_PRUNED {
                // Every new payment is looked up first, and nearly all are
                // absent: a bloom filter answers those without reading.
                let mut table = rocksdb::BlockBasedOptions::default();
                table.set_bloom_filter(10.0, false);
                cf_opts.set_block_based_table_factory(&table);
            }
            ColumnFamilyDescriptor::new(name, cf_opts)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        Self::check_schema(&db)?;
        Self::build_index(&db)?;
        Self::build_tx_index(&db)?;
        Ok(db)
    }

    /// Builds the indexes, once, for a ledger written before they existed.
    fn build_index(db: &DB) -> Result<()> {
        if db.get_cf(cf(db, CF_META), INDEXED_KEY)?.is_some() {
            return Ok(());
        }
        let mut wb = rocksdb::WriteBatch::default();
        let mut indexed = 0u64;
        let flush = |wb: &mut rocksdb::WriteBatch, indexed: &mut u64| -> Result<()> {
            *indexed += 1;
            if wb.len() >= CHUNK {
                db.write(std::mem::take(wb))?;
                if indexed.is_multiple_of(1 << 20) {
                    tracing::info!(indexed, "indexing the ledger");
                }
            }
            Ok(())
        };
        for item in db.iterator_cf(cf(db, CF_PAYMENTS), IteratorMode::Start) {
            let (_, value) = item?;
            wb.put_cf(cf(db, CF_BY_VALID_BEFORE), by_valid_before_key(&records::decode_payment(&value)?), []);
            flush(&mut wb, &mut indexed)?;
        }
        for item in db.iterator_cf(cf(db, CF_EVENTS), IteratorMode::Start) {
            let (key, value) = item?;
            let sequence = decode_sequence(&key)?;
            let event = records::decode_event(sequence, &value)?;
            wb.put_cf(cf(db, CF_EVENTS_BY_MERCHANT), merchant_event_key(event.merchant_number, sequence), []);
            flush(&mut wb, &mut indexed)?;
        }
        for item in db.iterator_cf(cf(db, CF_CHANNELS), IteratorMode::Start) {
            let (_, value) = item?;
            wb.put_cf(cf(db, CF_CHANNELS_BY_MERCHANT), merchant_channel_key(&records::decode_channel(&value)?), []);
            flush(&mut wb, &mut indexed)?;
        }
        wb.put_cf(cf(db, CF_META), INDEXED_KEY, []);
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        db.write_opt(wb, &wo)?;
        if indexed > 0 {
            tracing::info!(indexed, "indexed the ledger's payments, events and channels");
        }
        Ok(())
    }

    /// Builds [`CF_PAYMENTS_BY_TX`], once, for a ledger written before it.
    fn build_tx_index(db: &DB) -> Result<()> {
        if db.get_cf(cf(db, CF_META), TX_INDEXED_KEY)?.is_some() {
            return Ok(());
        }
        let mut wb = rocksdb::WriteBatch::default();
        let mut indexed = 0u64;
        for item in db.iterator_cf(cf(db, CF_PAYMENTS), IteratorMode::Start) {
            let (_, value) = item?;
            let payment = records::decode_payment(&value)?;
            if let Some(tx) = payment.status.transaction {
                wb.put_cf(cf(db, CF_PAYMENTS_BY_TX), by_tx_key(&tx, &payment.id), []);
                indexed += 1;
            }
            if wb.len() >= CHUNK {
                db.write(std::mem::take(&mut wb))?;
            }
        }
        wb.put_cf(cf(db, CF_META), TX_INDEXED_KEY, []);
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        db.write_opt(wb, &wo)?;
        if indexed > 0 {
            tracing::info!(indexed, "indexed the ledger's payments by settlement transaction");
        }
        Ok(())
    }

    /// The open database. After a failed write any access (a read as
    /// much as a commit) first reopens it, at most once per
    /// [`REOPEN_EVERY`]; an error while it cannot be opened yet.
    fn db(&self) -> Result<Open<'_>> {
        if self.failed.load(Ordering::Acquire) {
            self.reopen()?;
        }
        let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
        if guard.is_none() {
            return Err(Error::LedgerClosed("reopened at the next access".into()));
        }
        Ok(Open(guard))
    }

    /// Closes the database after a failed write and opens it again, at
    /// most once per [`REOPEN_EVERY`].
    fn reopen(&self) -> Result<()> {
        {
            let mut next = self.next_reopen.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            if now < *next {
                return Err(Error::LedgerClosed("a write failed; reopening shortly".into()));
            }
            *next = now + REOPEN_EVERY;
        }
        let mut guard = self.db.write().unwrap_or_else(PoisonError::into_inner);
        // Closed first: the new handle needs the directory's lock.
        drop(guard.take());
        let db = Self::open_db(&self.path).map_err(|e| Error::LedgerClosed(e.to_string()))?;
        *guard = Some(db);
        self.failed.store(false, Ordering::Release);
        tracing::warn!(path = %self.path.display(), "the ledger is open again after a failed write");
        Ok(())
    }

    /// Up to `limit` events of merchant `merchant_number` from sequence
    /// `from` on, in `direction`, read by the merchant index without going
    /// over other merchants'.
    fn merchant_events_from(
        &self,
        merchant_number: u32,
        from: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<SettlementEvent>> {
        let db = self.db()?;
        let mut out = Vec::new();
        let from = merchant_event_key(merchant_number, from);
        for item in db.iterator_cf(cf(&db, CF_EVENTS_BY_MERCHANT), IteratorMode::From(&from, direction)) {
            let (key, _) = item?;
            if out.len() == limit || key.len() != 12 || key[..4] != merchant_number.to_be_bytes() {
                break;
            }
            let sequence = decode_sequence(&key[4..])?;
            // An entry whose event retention deleted in between, or one
            // another merchant's event replaced.
            let Some(value) = db.get_pinned_cf(cf(&db, CF_EVENTS), sequence.to_be_bytes())? else { continue };
            let event = records::decode_event(sequence, &value)?;
            if event.merchant_number == merchant_number {
                out.push(event);
            }
        }
        Ok(out)
    }

    fn check_schema(db: &DB) -> Result<()> {
        let meta = cf(db, CF_META);
        match db.get_cf(meta, SCHEMA_KEY)? {
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
                db.put_cf_opt(meta, SCHEMA_KEY, SCHEMA_VERSION.to_be_bytes(), &wo)?;
            }
        }
        Ok(())
    }
}

impl Ledger for RocksLedger {
    fn commit(&self, batch: &WriteBatch) -> Result<()> {
        use super::Write;
        let db = self.db()?;
        let cf = |name| cf(&db, name);
        let mut wb = rocksdb::WriteBatch::default();
        for write in batch.writes() {
            match write {
                Write::Payment(p) => {
                    wb.put_cf(cf(CF_PAYMENTS), p.id.0, records::encode_payment(p));
                    wb.put_cf(cf(CF_BY_VALID_BEFORE), by_valid_before_key(p), []);
                    if let Some(tx) = &p.status.transaction {
                        wb.put_cf(cf(CF_PAYMENTS_BY_TX), by_tx_key(tx, &p.id), []);
                    }
                }
                Write::Enqueue(key) => wb.put_cf(cf(CF_PENDING), records::pending_key(key), []),
                Write::Dequeue(key) => wb.delete_cf(cf(CF_PENDING), records::pending_key(key)),
                Write::Event(e) => {
                    wb.put_cf(cf(CF_EVENTS), e.sequence.to_be_bytes(), records::encode_event(e));
                    wb.put_cf(cf(CF_EVENTS_BY_MERCHANT), merchant_event_key(e.merchant_number, e.sequence), []);
                }
                Write::Merchant(m) => wb.put_cf(cf(CF_MERCHANTS), m.id.as_bytes(), records::encode_merchant(m)),
                Write::Intent(i) => {
                    wb.put_cf(cf(CF_INTENTS), records::intent_key(&i.key()), records::encode_intent(i));
                }
                Write::Channel(c) => {
                    wb.put_cf(cf(CF_CHANNELS), c.channel.id, records::encode_channel(c));
                    wb.put_cf(cf(CF_CHANNELS_BY_MERCHANT), merchant_channel_key(c), []);
                }
                Write::ForgetIntent(key) => {
                    wb.delete_cf(cf(CF_INTENTS), records::intent_key(key));
                }
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(self.sync);
        if let Err(e) = db.write_opt(wb, &wo) {
            // RocksDB now refuses every write until it is opened again.
            tracing::error!(error = %e, "a ledger write failed; the ledger reopens before the next commit");
            self.failed.store(true, Ordering::Release);
            return Err(e.into());
        }
        Ok(())
    }

    fn payment(&self, id: &PaymentId) -> Result<Option<PaymentRecord>> {
        let db = self.db()?;
        db.get_pinned_cf(cf(&db, CF_PAYMENTS), id.0)?.map(|v| records::decode_payment(&v)).transpose()
    }

    fn payments(&self, ids: &[PaymentId]) -> Result<Vec<PaymentRecord>> {
        let db = self.db()?;
        let payments = cf(&db, CF_PAYMENTS);
        let mut out = Vec::new();
        for value in db.batched_multi_get_cf(payments, ids.iter().map(|id| id.0.as_slice()), false) {
            if let Some(value) = value? {
                out.push(records::decode_payment(&value)?);
            }
        }
        Ok(out)
    }

    fn pruned(&self, ids: &[PaymentId]) -> Result<Vec<PaymentId>> {
        if !self.has_pruned.load(Ordering::Acquire) {
            return Ok(Vec::new());
        }
        let db = self.db()?;
        let mut out = Vec::new();
        let found = db.batched_multi_get_cf(cf(&db, CF_PRUNED), ids.iter().map(|id| id.0.as_slice()), false);
        for (id, value) in ids.iter().zip(found) {
            if value?.is_some() {
                out.push(*id);
            }
        }
        Ok(out)
    }

    fn for_each_payment(&self, visit: &mut dyn FnMut(PaymentRecord)) -> Result<()> {
        let db = self.db()?;
        for item in db.iterator_cf(cf(&db, CF_PAYMENTS), IteratorMode::Start) {
            let (_, value) = item?;
            visit(records::decode_payment(&value)?);
        }
        Ok(())
    }

    fn for_each_payment_valid_from(&self, from: u64, visit: &mut dyn FnMut(PaymentRecord)) -> Result<()> {
        let db = self.db()?;
        let start = from.to_be_bytes();
        for item in db.iterator_cf(cf(&db, CF_BY_VALID_BEFORE), IteratorMode::From(&start, Direction::Forward)) {
            let (key, _) = item?;
            let (valid_before, id) = decode_by_valid_before(&key)?;
            let Some(bytes) = db.get_pinned_cf(cf(&db, CF_PAYMENTS), id.0)? else { continue };
            let payment = records::decode_payment(&bytes)?;
            // An entry a rewrite with another validBefore left behind.
            if payment.authorization.valid_before_secs() == valid_before {
                visit(payment);
            }
        }
        Ok(())
    }

    fn prune(&self, before: u64) -> Result<Pruned> {
        let db = self.db()?;
        let mut pruned = Pruned::default();
        let mut wb = rocksdb::WriteBatch::default();
        let end = before.to_be_bytes();
        let mut iter = db.raw_iterator_cf(cf(&db, CF_BY_VALID_BEFORE));
        iter.seek_to_first();
        while let Some(key) = iter.key() {
            if key[..8.min(key.len())] >= end[..] {
                break;
            }
            let (valid_before, id) = decode_by_valid_before(key)?;
            match db.get_pinned_cf(cf(&db, CF_PAYMENTS), id.0)? {
                Some(bytes) => {
                    let payment = records::decode_payment(&bytes)?;
                    let current = payment.authorization.valid_before_secs() == valid_before;
                    if !current || !payment.status.state.is_open() {
                        wb.delete_cf(cf(&db, CF_BY_VALID_BEFORE), key);
                        if current {
                            wb.delete_cf(cf(&db, CF_PAYMENTS), id.0);
                            if let Some(tx) = &payment.status.transaction {
                                wb.delete_cf(cf(&db, CF_PAYMENTS_BY_TX), by_tx_key(tx, &id));
                            }
                            wb.put_cf(cf(&db, CF_PRUNED), id.0, []);
                            self.has_pruned.store(true, Ordering::Release);
                            pruned.payments += 1;
                        }
                    }
                }
                None => wb.delete_cf(cf(&db, CF_BY_VALID_BEFORE), key),
            }
            if wb.len() >= CHUNK {
                db.write(std::mem::take(&mut wb))?;
            }
            iter.next();
        }
        iter.status()?;
        // The oldest events, up to the first one as recent as `before`;
        // never the newest.
        let last = last_sequence(&db)?;
        for item in db.iterator_cf(cf(&db, CF_EVENTS), IteratorMode::Start) {
            let (key, value) = item?;
            let sequence = decode_sequence(&key)?;
            let event = records::decode_event(sequence, &value)?;
            if sequence == last || event.status.updated_at_ms / 1000 >= before {
                break;
            }
            wb.delete_cf(cf(&db, CF_EVENTS), key);
            wb.delete_cf(cf(&db, CF_EVENTS_BY_MERCHANT), merchant_event_key(event.merchant_number, sequence));
            pruned.events += 1;
            if wb.len() >= CHUNK {
                db.write(std::mem::take(&mut wb))?;
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        db.write_opt(wb, &wo)?;
        Ok(pruned)
    }

    fn pending(&self) -> Result<Vec<PendingKey>> {
        let db = self.db()?;
        db.iterator_cf(cf(&db, CF_PENDING), IteratorMode::Start)
            .map(|item| records::decode_pending_key(&item?.0))
            .collect()
    }

    fn pending_head(&self, per_merchant: usize) -> Result<Vec<PendingKey>> {
        let db = self.db()?;
        let mut out = Vec::new();
        let mut iter = db.raw_iterator_cf(cf(&db, CF_PENDING));
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
        let db = self.db()?;
        db.iterator_cf(cf(&db, CF_MERCHANTS), IteratorMode::Start)
            .map(|item| records::decode_merchant(&item?.1))
            .collect()
    }

    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<SettlementEvent>> {
        let db = self.db()?;
        let Some(start) = after.checked_add(1) else { return Ok(Vec::new()) };
        let start = start.to_be_bytes();
        db.iterator_cf(cf(&db, CF_EVENTS), IteratorMode::From(&start, Direction::Forward))
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

    fn merchant_events_after(&self, merchant_number: u32, after: u64, limit: usize) -> Result<Vec<SettlementEvent>> {
        let Some(first) = after.checked_add(1) else { return Ok(Vec::new()) };
        self.merchant_events_from(merchant_number, first, Direction::Forward, limit)
    }

    fn merchant_events_before(&self, merchant_number: u32, before: u64, limit: usize) -> Result<Vec<SettlementEvent>> {
        let Some(last) = before.checked_sub(1) else { return Ok(Vec::new()) };
        self.merchant_events_from(merchant_number, last, Direction::Reverse, limit)
    }

    fn payments_by_transaction(&self, tx: &B256) -> Result<Vec<PaymentRecord>> {
        let db = self.db()?;
        let mut out = Vec::new();
        for item in db.iterator_cf(cf(&db, CF_PAYMENTS_BY_TX), IteratorMode::From(tx.as_slice(), Direction::Forward)) {
            let (key, _) = item?;
            if key.len() != 64 || key[..32] != tx[..] {
                break;
            }
            // An entry of a payment retention deleted is skipped.
            let Some(value) = db.get_pinned_cf(cf(&db, CF_PAYMENTS), &key[32..])? else { continue };
            out.push(records::decode_payment(&value)?);
        }
        Ok(out)
    }

    fn merchant_channels(&self, merchant_id: &str) -> Result<Vec<ChannelRecord>> {
        let db = self.db()?;
        let prefix = merchant_channel_prefix(merchant_id);
        let mut out = Vec::new();
        for item in db.iterator_cf(cf(&db, CF_CHANNELS_BY_MERCHANT), IteratorMode::From(&prefix, Direction::Forward)) {
            let (key, _) = item?;
            if !key.starts_with(&prefix) {
                break;
            }
            let Some(value) = db.get_pinned_cf(cf(&db, CF_CHANNELS), &key[prefix.len()..])? else { continue };
            let record = records::decode_channel(&value)?;
            if record.merchant_id == merchant_id {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn intents(&self) -> Result<Vec<TxIntent>> {
        let db = self.db()?;
        db.iterator_cf(cf(&db, CF_INTENTS), IteratorMode::Start).map(|item| records::decode_intent(&item?.1)).collect()
    }

    fn intent(&self, key: &IntentKey) -> Result<Option<TxIntent>> {
        let db = self.db()?;
        db.get_pinned_cf(cf(&db, CF_INTENTS), records::intent_key(key))?.map(|v| records::decode_intent(&v)).transpose()
    }

    fn channels(&self) -> Result<Vec<ChannelRecord>> {
        let db = self.db()?;
        db.iterator_cf(cf(&db, CF_CHANNELS), IteratorMode::Start)
            .map(|item| records::decode_channel(&item?.1))
            .collect()
    }

    fn channel(&self, id: &alloy::primitives::B256) -> Result<Option<ChannelRecord>> {
        let db = self.db()?;
        db.get_pinned_cf(cf(&db, CF_CHANNELS), id)?.map(|v| records::decode_channel(&v)).transpose()
    }

    fn last_event_sequence(&self) -> Result<u64> {
        last_sequence(&*self.db()?)
    }
}

fn decode_sequence(key: &[u8]) -> Result<u64> {
    Ok(u64::from_be_bytes(key.try_into().map_err(|_| Error::Corrupt("event key is not 8 bytes"))?))
}

/// The sequence of the last event, 0 when there is none.
fn last_sequence(db: &DB) -> Result<u64> {
    match db.iterator_cf(cf(db, CF_EVENTS), IteratorMode::End).next() {
        Some(item) => decode_sequence(&item?.0),
        None => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ledger_written_before_its_indexes_is_indexed_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = super::super::conformance::sample_payment(7, 4_000);
        let tx = B256::repeat_byte(0x7e);
        p.status.transaction = Some(tx);
        let channel = super::super::conformance::sample_channel(3, 10, false);
        {
            let ledger = RocksLedger::open(dir.path(), RocksOptions::default()).unwrap();
            let mut batch = WriteBatch::default();
            batch.push(super::super::Write::Payment(Box::new(p.clone())));
            batch.push(super::super::Write::Event(SettlementEvent {
                sequence: 1,
                merchant_number: 5,
                payment_id: p.id,
                status: p.status.clone(),
                channel: None,
            }));
            batch.push(super::super::Write::Channel(Box::new(channel.clone())));
            ledger.commit(&batch).unwrap();
            // As an older version left it: no indexes, no marker.
            let db = ledger.db().unwrap();
            db.delete_cf(cf(&db, CF_BY_VALID_BEFORE), by_valid_before_key(&p)).unwrap();
            db.delete_cf(cf(&db, CF_EVENTS_BY_MERCHANT), merchant_event_key(5, 1)).unwrap();
            db.delete_cf(cf(&db, CF_CHANNELS_BY_MERCHANT), merchant_channel_key(&channel)).unwrap();
            db.delete_cf(cf(&db, CF_PAYMENTS_BY_TX), by_tx_key(&tx, &p.id)).unwrap();
            db.delete_cf(cf(&db, CF_META), INDEXED_KEY).unwrap();
            db.delete_cf(cf(&db, CF_META), TX_INDEXED_KEY).unwrap();
        }
        let ledger = RocksLedger::open(dir.path(), RocksOptions::default()).unwrap();
        let mut found = Vec::new();
        ledger.for_each_payment_valid_from(3_000, &mut |p| found.push(p)).unwrap();
        assert_eq!(found, [p.clone()]);
        assert_eq!(ledger.merchant_events_after(5, 0, 10).unwrap().len(), 1);
        assert_eq!(ledger.merchant_channels(&channel.merchant_id).unwrap(), [channel]);
        assert_eq!(ledger.payments_by_transaction(&tx).unwrap(), [p]);
    }

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
        let db = ledger.db().unwrap();
        db.put_cf_opt(cf(&db, CF_META), SCHEMA_KEY, 99u32.to_be_bytes(), &wo).unwrap();
        drop(db);
        drop(ledger);
        let err = RocksLedger::open(dir.path(), RocksOptions::default()).unwrap_err();
        assert!(matches!(err, Error::Schema { found: 99, expected: 1 }), "{err}");
    }
}

/// A full disk, for real: a small tmpfs (mounting needs root, which the
/// test machines and CI have).
#[cfg(test)]
mod full_disk {
    use super::*;
    use crate::{domain::PaymentId, ledger::Write, testing::Tmpfs};

    fn payment(n: u64) -> Box<PaymentRecord> {
        let mut p = crate::ledger::conformance::sample_payment(1, 1);
        p.id = PaymentId(alloy::primitives::keccak256(n.to_be_bytes()));
        Box::new(p)
    }

    fn commit(ledger: &RocksLedger, from: u64, n: u64) -> Result<()> {
        let mut batch = WriteBatch::default();
        for i in from..from + n {
            batch.push(Write::Payment(payment(i)));
        }
        ledger.commit(&batch)
    }

    #[test]
    fn after_a_full_disk_the_ledger_resumes_by_itself_once_space_is_back() {
        let fs = Tmpfs::mount(8).expect("mounting a tmpfs needs root");
        let filler = fs.path().join("filler");
        std::fs::write(&filler, vec![0u8; 3 << 20]).unwrap();
        let ledger = RocksLedger::open(fs.path().join("ledger"), RocksOptions::default()).unwrap();
        let mut written = 0;
        let err = loop {
            match commit(&ledger, written, 100) {
                Ok(()) => written += 100,
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("No space left"), "{err}");
        assert!(commit(&ledger, 1 << 40, 1).is_err(), "still full");
        // A reopen while the disk is still full may fail and leave it closed.
        std::thread::sleep(REOPEN_EVERY);
        let _ = ledger.payments(&[payment(0).id]);

        std::fs::remove_file(&filler).unwrap();
        // Reads alone reopen it (the committer reads before it writes)...
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = ledger.payments(&[payment(0).id]) {
            assert!(e.is_retryable(), "{e}");
            assert!(Instant::now() < deadline, "the ledger never reopened: {e}");
            std::thread::sleep(Duration::from_millis(100));
        }
        // ... and commits succeed again.
        while let Err(e) = commit(&ledger, 1 << 41, 1) {
            assert!(e.is_retryable(), "{e}");
            assert!(Instant::now() < deadline, "the ledger never resumed: {e}");
            std::thread::sleep(Duration::from_millis(100));
        }
        // Everything acknowledged before the disk filled is there.
        for i in (0..written).step_by(97) {
            assert!(ledger.payment(&payment(i).id).unwrap().is_some(), "payment {i} of {written} lost");
        }
        assert!(ledger.payment(&payment(1 << 41).id).unwrap().is_some());
    }
}
