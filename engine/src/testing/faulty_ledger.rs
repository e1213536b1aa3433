//! [`FaultyLedger`]: a ledger that fails, stalls or lies about its writes
//! when a test says so, in front of a real one.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use crate::{
    Error, Result,
    domain::{ChannelRecord, IntentKey, Merchant, PaymentId, PaymentRecord, PendingKey, SettlementEvent, TxIntent},
    ledger::{Ledger, Pruned, WriteBatch},
};

/// Faults drawn at random per commit, from a seed (so a run can be
/// replayed), in parts per thousand of commits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RandomFaults {
    /// The seed of the draws.
    pub seed: u64,
    /// Commits refused before anything is written (an I/O error, a full
    /// disk).
    pub fail_before: u32,
    /// Commits written and then reported failed (an fsync that failed
    /// after the write reached the log): on disk, though the caller was
    /// told otherwise.
    pub fail_after: u32,
    /// Commits that stall for [`RandomFaults::stall`] first.
    pub stalls: u32,
    /// How long a stall lasts.
    pub stall: Duration,
}

/// What a [`FaultyLedger`] has injected so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Injected {
    /// Commits refused before writing.
    pub failed_before: u64,
    /// Commits written, then reported failed.
    pub failed_after: u64,
    /// Commits that stalled.
    pub stalled: u64,
    /// Reads refused.
    pub reads_failed: u64,
    /// Commits the ledger beneath refused by itself (a full disk, for real).
    pub inner_failed: u64,
}

/// A ledger in front of `inner` that fails as a test says: every commit
/// while [`FaultyLedger::fail_commits`] is on, the next
/// [`FaultyLedger::fail_next`] ones, reads while
/// [`FaultyLedger::fail_reads`] is on, and at random per
/// [`RandomFaults`]. A test holding [`FaultyLedger::hold`] stalls every
/// commit until it lets go.
#[derive(Debug)]
pub struct FaultyLedger {
    inner: Arc<dyn Ledger>,
    broken: AtomicBool,
    failing: AtomicBool,
    fail_next: AtomicUsize,
    reads_failing: AtomicBool,
    stall: Mutex<()>,
    random: Mutex<Option<(RandomFaults, u64)>>,
    commits: AtomicU64,
    failed_before: AtomicU64,
    failed_after: AtomicU64,
    stalled: AtomicU64,
    reads_failed: AtomicU64,
    inner_failed: AtomicU64,
}

impl FaultyLedger {
    /// `inner`, with no fault yet.
    pub fn new(inner: Arc<dyn Ledger>) -> Self {
        Self {
            inner,
            broken: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            fail_next: AtomicUsize::new(0),
            reads_failing: AtomicBool::new(false),
            stall: Mutex::new(()),
            random: Mutex::new(None),
            commits: AtomicU64::new(0),
            failed_before: AtomicU64::new(0),
            failed_after: AtomicU64::new(0),
            stalled: AtomicU64::new(0),
            reads_failed: AtomicU64::new(0),
            inner_failed: AtomicU64::new(0),
        }
    }

    /// Every later commit panics: input the ledger did not expect kills the
    /// thread writing it.
    pub fn break_commits(&self) {
        self.broken.store(true, Ordering::SeqCst);
    }

    /// Every commit fails (as on a full disk) while `on`.
    pub fn fail_commits(&self, on: bool) {
        self.failing.store(on, Ordering::SeqCst);
    }

    /// The next `n` commits fail.
    pub fn fail_next(&self, n: usize) {
        self.fail_next.store(n, Ordering::SeqCst);
    }

    /// Reads of payments, channels and events fail while `on`.
    pub fn fail_reads(&self, on: bool) {
        self.reads_failing.store(on, Ordering::SeqCst);
    }

    /// Draws faults per commit from now on (`None`: no more).
    pub fn random(&self, faults: Option<RandomFaults>) {
        *self.random.lock().unwrap_or_else(PoisonError::into_inner) = faults.map(|f| (f, f.seed | 1));
    }

    /// Commits stall while the guard lives.
    pub fn hold(&self) -> std::sync::MutexGuard<'_, ()> {
        self.stall.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Commits begun so far (counted before any stall).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::SeqCst)
    }

    /// The faults injected so far.
    pub fn injected(&self) -> Injected {
        Injected {
            failed_before: self.failed_before.load(Ordering::SeqCst),
            failed_after: self.failed_after.load(Ordering::SeqCst),
            stalled: self.stalled.load(Ordering::SeqCst),
            reads_failed: self.reads_failed.load(Ordering::SeqCst),
            inner_failed: self.inner_failed.load(Ordering::SeqCst),
        }
    }

    /// The random faults of this commit, if any: (fail before, fail after, stall).
    fn draw(&self) -> (bool, bool, Option<Duration>) {
        let mut random = self.random.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((faults, state)) = random.as_mut() else { return (false, false, None) };
        let mut next = || {
            // xorshift64: reproducible from the seed, no dependency.
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            (*state % 1000) as u32
        };
        let stall = (next() < faults.stalls).then_some(faults.stall);
        let roll = next();
        (roll < faults.fail_before, (faults.fail_before..faults.fail_before + faults.fail_after).contains(&roll), stall)
    }

    fn read<T>(&self, read: impl FnOnce() -> Result<T>) -> Result<T> {
        if self.reads_failing.load(Ordering::SeqCst) {
            self.reads_failed.fetch_add(1, Ordering::SeqCst);
            return Err(Error::Storage("IO error: Input/output error reading sst 000042".into()));
        }
        read()
    }
}

impl Ledger for FaultyLedger {
    fn commit(&self, batch: &WriteBatch) -> Result<()> {
        self.commits.fetch_add(1, Ordering::SeqCst);
        assert!(!self.broken.load(Ordering::SeqCst), "the ledger broke");
        drop(self.hold());
        let (before, after, stall) = self.draw();
        if let Some(stall) = stall {
            self.stalled.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(stall);
        }
        let next = self.fail_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if before || next || self.failing.load(Ordering::SeqCst) {
            self.failed_before.fetch_add(1, Ordering::SeqCst);
            return Err(Error::Storage("IO error: No space left on device".into()));
        }
        if let Err(e) = self.inner.commit(batch) {
            self.inner_failed.fetch_add(1, Ordering::SeqCst);
            return Err(e);
        }
        if after {
            self.failed_after.fetch_add(1, Ordering::SeqCst);
            return Err(Error::Io(std::io::Error::other("fsync: Input/output error")));
        }
        Ok(())
    }

    fn payment(&self, id: &PaymentId) -> Result<Option<PaymentRecord>> {
        self.read(|| self.inner.payment(id))
    }

    fn payments(&self, ids: &[PaymentId]) -> Result<Vec<PaymentRecord>> {
        self.read(|| self.inner.payments(ids))
    }

    fn for_each_payment(&self, visit: &mut dyn FnMut(PaymentRecord)) -> Result<()> {
        self.inner.for_each_payment(visit)
    }

    fn for_each_payment_valid_from(&self, from: u64, visit: &mut dyn FnMut(PaymentRecord)) -> Result<()> {
        self.inner.for_each_payment_valid_from(from, visit)
    }

    fn prune(&self, before: u64) -> Result<Pruned> {
        self.inner.prune(before)
    }

    fn pruned(&self, ids: &[PaymentId]) -> Result<Vec<PaymentId>> {
        self.inner.pruned(ids)
    }

    fn pending(&self) -> Result<Vec<PendingKey>> {
        self.inner.pending()
    }

    fn pending_head(&self, per_merchant: usize) -> Result<Vec<PendingKey>> {
        self.inner.pending_head(per_merchant)
    }

    fn merchants(&self) -> Result<Vec<Merchant>> {
        self.inner.merchants()
    }

    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<SettlementEvent>> {
        self.read(|| self.inner.events_after(after, limit))
    }

    fn merchant_events_after(&self, merchant_number: u32, after: u64, limit: usize) -> Result<Vec<SettlementEvent>> {
        self.read(|| self.inner.merchant_events_after(merchant_number, after, limit))
    }

    fn merchant_events_before(&self, merchant_number: u32, before: u64, limit: usize) -> Result<Vec<SettlementEvent>> {
        self.read(|| self.inner.merchant_events_before(merchant_number, before, limit))
    }

    fn payments_by_transaction(&self, tx: &alloy::primitives::B256) -> Result<Vec<PaymentRecord>> {
        self.read(|| self.inner.payments_by_transaction(tx))
    }

    fn last_event_sequence(&self) -> Result<u64> {
        self.inner.last_event_sequence()
    }

    fn intents(&self) -> Result<Vec<TxIntent>> {
        self.inner.intents()
    }

    fn intent(&self, key: &IntentKey) -> Result<Option<TxIntent>> {
        self.inner.intent(key)
    }

    fn channels(&self) -> Result<Vec<ChannelRecord>> {
        self.read(|| self.inner.channels())
    }

    fn merchant_channels(&self, merchant_id: &str) -> Result<Vec<ChannelRecord>> {
        self.read(|| self.inner.merchant_channels(merchant_id))
    }

    fn channel(&self, id: &alloy::primitives::B256) -> Result<Option<ChannelRecord>> {
        self.read(|| self.inner.channel(id))
    }
}

/// A small filesystem of its own, to fill for real: a tmpfs at a fresh
/// directory, unmounted on drop. Mounting needs root (the test machines
/// and CI have it).
#[derive(Debug)]
pub struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    /// A tmpfs of `mib` MiB.
    pub fn mount(mib: u32) -> std::io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()?;
        if !status.success() {
            return Err(std::io::Error::other(format!("mount -t tmpfs failed ({status}): it needs root")));
        }
        Ok(Self(dir))
    }

    /// Where it is mounted.
    pub fn path(&self) -> &std::path::Path {
        self.0.path()
    }

    /// Writes a file at `name` until the filesystem is full; returns its
    /// path and size.
    pub fn fill(&self, name: &str) -> std::io::Result<(std::path::PathBuf, u64)> {
        use std::io::Write;
        let path = self.path().join(name);
        let mut file = std::fs::File::create(&path)?;
        let chunk = vec![0u8; 64 << 10];
        let mut written = 0u64;
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => return Err(e),
            }
        }
        // What is left is less than a chunk: fill that too.
        loop {
            match file.write(&chunk[..512]) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(_) => break,
            }
        }
        Ok((path, written))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: a ledger a failed test left open must not leave it mounted.
        let _ = std::process::Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}
