//! [`ChainBalances`]: payer balances read from a chain and cached.
//!
//! One cache per chain, keyed by (token, owner), split into stripes each
//! behind its own short mutex: a shard thread's lookup locks one stripe,
//! reads the entry and stamps its use, with no allocation and no await. A
//! miss answers [`Lookup::Pending`] and starts a fetch (`balanceOf`, and
//! `eth_getCode` of the owner beside it) on the tokio runtime captured at
//! construction; when it is done every notifier
//! that asked is called with the result. One fetch per key is in flight at a
//! time.
//!
//! Freshness, two ways:
//! - a follower task reads, every `poll`, the `Transfer` logs of every
//!   cached token from the last block it saw to the head, and re-reads the
//!   balance of each cached owner that sent or received tokens. A transfer
//!   seen while that owner's fetch is in flight makes it fetch again after.
//!   At its first tick it re-reads whatever is already cached; when it
//!   falls more than `MAX_LOG_RANGE` blocks behind (the node was
//!   unreachable) it forgets the cache instead of catching up;
//! - a TTL: the first use of an entry older than `ttl` re-reads it in the
//!   background while the old value is still served. A failed re-read keeps
//!   serving the old value and is retried after `poll`.
//!
//! A failed first fetch caches nothing: its waiters get the error (the
//! payments are answered UNAVAILABLE) and the next lookup tries again.
//! Entries unused for `idle` are dropped, and beyond `max_entries` the least
//! recently used go first; an entry that payments wait on is never dropped.
//!
//! Settlement and the cache: a settled payment's reservation is released
//! only once a read of its payer's balance that started after the
//! settlement is done ([`BalanceSource::refresh`]: a read in flight then
//! may predate it, so the refresh waits for the next one). Until then the
//! settled value counts twice (in the cached balance and as reserved),
//! which errs on the safe side: a payer near its limit may be refused a
//! payment it could afford for one read's time. It never counts zero
//! times. When a read fails, the reservation stays and the shard asks
//! again at its next sweep.
//!
//! Payments on other chains are asked of a fallback source (unlimited by
//! default).

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use alloy::primitives::Address;
use crossbeam::utils::CachePadded;
use tokio::{runtime::Handle, task::AbortHandle, time::MissedTickBehavior};
use x402_chain::Chain;

use super::{Account, BalanceKey, BalanceSource, Fetched, Lookup, Notifier};
use crate::{Error, Result};

/// Most blocks the follower reads logs for in one tick; further behind, it
/// forgets the cache rather than catch up.
pub(crate) const MAX_LOG_RANGE: u64 = 1_000;

/// Lock stripes of the cache.
const STRIPES: usize = 64;

/// How often idle entries are dropped (sooner when over the bound).
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// How [`ChainBalances`] keeps its cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainBalancesConfig {
    /// A cached balance older than this is re-read on its next use, the old
    /// value served meanwhile.
    pub ttl: Duration,
    /// How often the follower reads new `Transfer` logs.
    pub poll: Duration,
    /// A fetch (or one follower round) that takes longer fails.
    pub fetch_timeout: Duration,
    /// Balances unused for this long are dropped.
    pub idle: Duration,
    /// Most balances kept.
    pub max_entries: usize,
    /// First reads of a balance in flight at most, and as many re-reads of
    /// cached ones (a `Transfer` seen, a TTL, a settlement), apart; the
    /// others wait their turn (up to `fetch_timeout`, then fail). Payments
    /// from many new payers at once (a flood of them) then cost the node's
    /// provider, and this process's connections to it, no more than this,
    /// and cannot hold up the re-reads that keep known payers' balances
    /// true.
    pub max_fetches: usize,
}

impl Default for ChainBalancesConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(30),
            poll: Duration::from_secs(1),
            fetch_timeout: Duration::from_secs(5),
            idle: Duration::from_secs(600),
            max_entries: 100_000,
            max_fetches: 32,
        }
    }
}

/// Payer balances of one chain, cached: a miss answers [`Lookup::Pending`]
/// and fetches on the tokio runtime, a follower task re-reads the owners its
/// `Transfer` logs name, and a TTL re-reads the rest in the background.
/// Dropping it stops the follower.
pub struct ChainBalances<C: Chain> {
    shared: Arc<Shared<C>>,
    fallback: Option<Arc<dyn BalanceSource>>,
    follower: AbortHandle,
}

struct Shared<C> {
    chain: Arc<C>,
    chain_id: u64,
    runtime: Handle,
    config: ChainBalancesConfig,
    stripes: Box<[Stripe]>,
    len: AtomicUsize,
    /// Tokens with cached balances: the follower reads their logs. Locked
    /// after (never while holding) a stripe.
    tokens: Mutex<HashSet<Address>>,
    next_fetch: AtomicU64,
    /// [`ChainBalancesConfig::max_fetches`] places for first reads.
    fetches: Arc<tokio::sync::Semaphore>,
    /// As many for re-reads of cached balances.
    rereads: Arc<tokio::sync::Semaphore>,
}

/// Entries by (token, owner), behind one lock.
type Stripe = CachePadded<Mutex<HashMap<(Address, Address), Entry>>>;

struct Entry {
    /// The last account read; `None` until the first fetch answers.
    balance: Option<Account>,
    /// The first use at or after this re-reads the balance.
    refresh_at: Instant,
    last_used: Instant,
    /// The fetch in flight: only its result is applied.
    fetch: Option<u64>,
    /// A transfer touched this owner while `fetch` was in flight.
    dirty: bool,
    /// Who waits for the first balance (or for the fetch in flight).
    waiters: Vec<Notifier>,
    /// Who waits for a fetch started after the one in flight.
    after_next: Vec<Notifier>,
}

impl<C: Chain> ChainBalances<C> {
    /// Starts a cache over `chain`, and its log follower on the current
    /// tokio runtime, where fetches will run too.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn new(chain: Arc<C>, config: ChainBalancesConfig) -> Self {
        let runtime = Handle::current();
        let shared = Arc::new(Shared {
            chain_id: chain.chain_id(),
            chain,
            runtime: runtime.clone(),
            stripes: (0..STRIPES).map(|_| CachePadded::new(Mutex::new(HashMap::new()))).collect(),
            len: AtomicUsize::new(0),
            tokens: Mutex::new(HashSet::new()),
            next_fetch: AtomicU64::new(0),
            fetches: Arc::new(tokio::sync::Semaphore::new(config.max_fetches.max(1))),
            rereads: Arc::new(tokio::sync::Semaphore::new(config.max_fetches.max(1))),
            config,
        });
        let follower = runtime.spawn(shared.clone().follow()).abort_handle();
        Self { shared, fallback: None, follower }
    }

    /// Payments on other chains ask `fallback` (otherwise they are not limited).
    #[must_use]
    pub fn with_fallback(mut self, fallback: Arc<dyn BalanceSource>) -> Self {
        self.fallback = Some(fallback);
        self
    }

    /// Balances cached (or being fetched for the first time).
    pub fn len(&self) -> usize {
        self.shared.len.load(Ordering::Relaxed)
    }

    /// Whether no balance is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<C: Chain> BalanceSource for ChainBalances<C> {
    fn refresh(&self, key: BalanceKey, notifier: &Notifier) -> bool {
        self.refresh_cached(key, notifier)
    }

    fn lookup(&self, key: BalanceKey, notifier: &Notifier) -> Lookup {
        let BalanceKey { chain_id, token, owner } = key;
        if chain_id != self.shared.chain_id {
            return self.fallback.as_ref().map_or(Lookup::Unlimited, |f| f.lookup(key, notifier));
        }
        let shared = &self.shared;
        let now = Instant::now();
        let mut inserted = false;
        let (answer, fetch) = {
            let mut stripe = shared.stripe(owner);
            match stripe.get_mut(&(token, owner)) {
                Some(entry) => {
                    entry.last_used = now;
                    match entry.balance {
                        Some(balance) => {
                            let stale = now >= entry.refresh_at && entry.fetch.is_none();
                            (Lookup::Known(balance), stale.then(|| shared.begin_fetch(entry)))
                        }
                        None => {
                            entry.waiters.push(notifier.clone());
                            (Lookup::Pending, None)
                        }
                    }
                }
                None => {
                    let mut entry = Entry {
                        balance: None,
                        refresh_at: now,
                        last_used: now,
                        fetch: None,
                        dirty: false,
                        waiters: vec![notifier.clone()],
                        after_next: Vec::new(),
                    };
                    let id = shared.begin_fetch(&mut entry);
                    stripe.insert((token, owner), entry);
                    inserted = true;
                    (Lookup::Pending, Some(id))
                }
            }
        };
        if inserted {
            shared.len.fetch_add(1, Ordering::Relaxed);
            // Before the fetch reads: the follower must cover every block
            // after the one the balance is read at.
            lock(&shared.tokens).insert(token);
        }
        if let Some(id) = fetch {
            shared.spawn_fetch(token, owner, id);
        }
        answer
    }
}

impl<C: Chain> ChainBalances<C> {
    /// See [`BalanceSource::refresh`].
    fn refresh_cached(&self, key: BalanceKey, notifier: &Notifier) -> bool {
        let BalanceKey { chain_id, token, owner } = key;
        if chain_id != self.shared.chain_id {
            return self.fallback.as_ref().is_some_and(|f| f.refresh(key, notifier));
        }
        let fetch = {
            let mut stripe = self.shared.stripe(owner);
            let Some(entry) = stripe.get_mut(&(token, owner)) else { return false };
            if entry.fetch.is_some() {
                // The read in flight may predate the settlement: the next.
                // A notifier waiting on the read in flight (an earlier
                // settlement's) waits for the next instead: its answer
                // releases every settlement it has seen, this one too.
                entry.dirty = true;
                entry.waiters.retain(|w| !w.same(notifier));
                if !entry.after_next.iter().any(|w| w.same(notifier)) {
                    entry.after_next.push(notifier.clone());
                }
                None
            } else {
                entry.waiters.push(notifier.clone());
                Some(self.shared.begin_fetch(entry))
            }
        };
        if let Some(id) = fetch {
            self.shared.spawn_fetch(token, owner, id);
        }
        true
    }
}

impl<C: Chain> Drop for ChainBalances<C> {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

impl<C: Chain> std::fmt::Debug for ChainBalances<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainBalances")
            .field("chain_id", &self.shared.chain_id)
            .field("entries", &self.len())
            .field("config", &self.shared.config)
            .field("fallback", &self.fallback)
            .finish_non_exhaustive()
    }
}

impl<C: Chain> Shared<C> {
    fn stripe(&self, owner: Address) -> MutexGuard<'_, HashMap<(Address, Address), Entry>> {
        // Addresses are hashes: any byte spreads evenly.
        lock(&self.stripes[usize::from(owner[19]) % STRIPES])
    }

    /// Marks `entry` as being fetched; the caller spawns the fetch once the
    /// stripe is unlocked.
    fn begin_fetch(&self, entry: &mut Entry) -> u64 {
        let id = self.next_fetch.fetch_add(1, Ordering::Relaxed);
        entry.fetch = Some(id);
        entry.dirty = false;
        id
    }

    fn spawn_fetch(self: &Arc<Self>, token: Address, owner: Address, id: u64) {
        // Whatever happens to the task (even a runtime shutting down before
        // it runs), the guard answers the waiters.
        let guard = FetchGuard { shared: self.clone(), token, owner, id, done: false };
        let cached = self.stripe(owner).get(&(token, owner)).is_some_and(|e| e.balance.is_some());
        let places = if cached { self.rereads.clone() } else { self.fetches.clone() };
        self.runtime.spawn(async move {
            let shared = guard.shared.clone();
            let place = tokio::time::timeout(shared.config.fetch_timeout, places.acquire_owned()).await;
            let Ok(Ok(_place)) = place else {
                let busy = format!("too many balance reads at once: none began in {:?}", shared.config.fetch_timeout);
                guard.finish(&Err(Arc::new(Error::Timeout(busy))));
                return;
            };
            let read = tokio::time::timeout(
                shared.config.fetch_timeout,
                futures::future::join(shared.chain.token_balance(token, owner), shared.chain.has_code(owner)),
            )
            .await;
            let fetched = match read {
                Ok((Err(x402_chain::Error::NoContract(_)), _)) => Ok(Account::NoToken),
                Ok((Ok(balance), Ok(true))) => Ok(Account::Contract(balance)),
                Ok((Ok(balance), Ok(false))) => Ok(Account::Funds(balance)),
                Ok((Err(e), _) | (_, Err(e))) => Err(Arc::new(Error::from(e))),
                Err(_) => Err(Arc::new(timed_out("balanceOf", shared.config.fetch_timeout))),
            };
            guard.finish(&fetched);
        });
    }

    /// Applies the result of fetch `id` and answers whoever waits for it.
    fn finish(self: &Arc<Self>, token: Address, owner: Address, id: u64, fetched: &Fetched) {
        let now = Instant::now();
        let (waiters, again) = {
            let mut stripe = self.stripe(owner);
            let Some(entry) = stripe.get_mut(&(token, owner)) else { return };
            if entry.fetch != Some(id) {
                return;
            }
            entry.fetch = None;
            let mut waiters = std::mem::take(&mut entry.waiters);
            match fetched {
                Ok(balance) => {
                    entry.balance = Some(*balance);
                    entry.refresh_at = now + self.config.ttl;
                }
                Err(e) => {
                    tracing::debug!(%token, %owner, error = %e, "balance fetch failed");
                    if entry.balance.is_none() {
                        // Nothing cached: whoever waited for a later read
                        // hears of this one's failure too.
                        waiters.append(&mut entry.after_next);
                        stripe.remove(&(token, owner));
                        self.len.fetch_sub(1, Ordering::Relaxed);
                    } else {
                        entry.refresh_at = now + self.config.poll.min(self.config.ttl);
                    }
                }
            }
            let again = stripe.get_mut(&(token, owner)).filter(|e| e.dirty).map(|e| {
                // Those who asked for a read after this one wait for the next.
                e.waiters = std::mem::take(&mut e.after_next);
                self.begin_fetch(e)
            });
            (waiters, again)
        };
        let key = BalanceKey { chain_id: self.chain_id, token, owner };
        for waiter in waiters {
            waiter.notify(key, fetched.clone());
        }
        if let Some(id) = again {
            self.spawn_fetch(token, owner, id);
        }
    }

    /// Re-reads `owner`'s balance of `token` if it is cached.
    fn touch(self: &Arc<Self>, token: Address, owner: Address) {
        let fetch = {
            let mut stripe = self.stripe(owner);
            let Some(entry) = stripe.get_mut(&(token, owner)) else { return };
            if entry.fetch.is_some() {
                entry.dirty = true;
                None
            } else {
                Some(self.begin_fetch(entry))
            }
        };
        if let Some(id) = fetch {
            self.spawn_fetch(token, owner, id);
        }
    }

    fn keys(&self) -> Vec<(Address, Address)> {
        self.stripes.iter().flat_map(|s| lock(s).keys().copied().collect::<Vec<_>>()).collect()
    }

    /// Follows the chain's transfers until aborted.
    async fn follow(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(self.config.poll);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let round = self.config.fetch_timeout.max(self.config.poll);
        let mut cursor = None;
        let mut failing = false;
        let mut last_sweep = Instant::now();
        loop {
            ticks.tick().await;
            let result = match tokio::time::timeout(round, self.follow_once(&mut cursor)).await {
                Ok(result) => result,
                Err(_) => Err(timed_out("transfer log round", round)),
            };
            match result {
                Ok(()) if failing => {
                    tracing::info!(chain_id = self.chain_id, "following transfer logs again");
                    failing = false;
                }
                Ok(()) => {}
                Err(e) => {
                    if !failing {
                        tracing::warn!(chain_id = self.chain_id, error = %e, "cannot read transfer logs: cached balances may be stale");
                    }
                    failing = true;
                }
            }
            if self.len.load(Ordering::Relaxed) > self.config.max_entries || last_sweep.elapsed() >= SWEEP_EVERY {
                last_sweep = Instant::now();
                self.sweep(last_sweep);
            }
        }
    }

    /// One round: the logs of blocks after `cursor` up to the head.
    async fn follow_once(self: &Arc<Self>, cursor: &mut Option<u64>) -> Result<()> {
        let head = self.chain.block_number().await?;
        let Some(last) = *cursor else {
            // Whatever was read before the first head is re-read.
            *cursor = Some(head);
            for (token, owner) in self.keys() {
                self.touch(token, owner);
            }
            return Ok(());
        };
        if head <= last {
            return Ok(());
        }
        if head - last > MAX_LOG_RANGE {
            tracing::warn!(
                chain_id = self.chain_id,
                behind = head - last,
                "transfer logs too far behind: forgetting cached balances"
            );
            self.forget_all();
            *cursor = Some(head);
            return Ok(());
        }
        let tokens: Vec<Address> = lock(&self.tokens).iter().copied().collect();
        let mut touched = HashSet::new();
        for token in tokens {
            for log in self.chain.transfer_logs(token, last + 1, head).await? {
                touched.insert((token, log.from));
                touched.insert((token, log.to));
            }
        }
        for (token, owner) in touched {
            self.touch(token, owner);
        }
        *cursor = Some(head);
        Ok(())
    }

    /// Drops every balance but those being fetched, which are read again.
    fn forget_all(&self) {
        for stripe in &self.stripes {
            let mut stripe = lock(stripe);
            let before = stripe.len();
            stripe.retain(|_, e| {
                e.dirty = e.fetch.is_some();
                e.dirty
            });
            self.len.fetch_sub(before - stripe.len(), Ordering::Relaxed);
        }
    }

    /// Drops balances unused for `idle`, then the least recently used
    /// beyond `max_entries`, and tokens with no balance left. Entries that
    /// payments wait on stay.
    fn sweep(&self, now: Instant) {
        let idle = self.config.idle;
        // Held throughout, so a token a lookup adds meanwhile is not lost.
        let mut tokens = lock(&self.tokens);
        let remove = |keep: &dyn Fn(&Entry) -> bool| {
            for stripe in &self.stripes {
                let mut stripe = lock(stripe);
                let before = stripe.len();
                stripe.retain(|_, e| !e.waiters.is_empty() || !e.after_next.is_empty() || keep(e));
                self.len.fetch_sub(before - stripe.len(), Ordering::Relaxed);
            }
        };
        remove(&|e| now.saturating_duration_since(e.last_used) < idle);
        let len = self.len.load(Ordering::Relaxed);
        if len > self.config.max_entries {
            let mut used: Vec<Instant> = self
                .stripes
                .iter()
                .flat_map(|s| {
                    lock(s).values().filter(|e| e.waiters.is_empty()).map(|e| e.last_used).collect::<Vec<_>>()
                })
                .collect();
            let excess = (len - self.config.max_entries).min(used.len());
            if excess > 0 {
                let cutoff = *used.select_nth_unstable(excess - 1).1;
                remove(&|e| e.last_used > cutoff);
            }
        }
        let mut cached = HashSet::new();
        for stripe in &self.stripes {
            cached.extend(lock(stripe).keys().map(|(token, _)| *token));
        }
        *tokens = cached;
    }
}

/// Answers a fetch's waiters exactly once, even if its task never runs.
struct FetchGuard<C: Chain> {
    shared: Arc<Shared<C>>,
    token: Address,
    owner: Address,
    id: u64,
    done: bool,
}

impl<C: Chain> FetchGuard<C> {
    fn finish(mut self, fetched: &Fetched) {
        self.done = true;
        self.shared.finish(self.token, self.owner, self.id, fetched);
    }
}

impl<C: Chain> Drop for FetchGuard<C> {
    fn drop(&mut self) {
        if !self.done {
            let abandoned = Error::Io(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "balance fetch abandoned: shutting down",
            ));
            self.shared.finish(self.token, self.owner, self.id, &Err(Arc::new(abandoned)));
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn timed_out(what: &str, after: Duration) -> Error {
    Error::Timeout(format!("{what}: no answer from the chain in {after:?}"))
}

#[cfg(test)]
mod tests {
    use alloy::primitives::{U256, address};
    use tokio::sync::mpsc;

    use super::*;
    use crate::{balance::ConfiguredBalances, testing::FakeChain};

    const CHAIN: u64 = 31337;
    const TOKEN: Address = address!("0x5FbDB2315678afecb367f032d93F642f64180aa3");
    const ALICE: Address = Address::repeat_byte(0xa1);
    const BOB: Address = Address::repeat_byte(0xb0);
    const CAROL: Address = Address::repeat_byte(0xc4);

    fn key(owner: Address) -> BalanceKey {
        BalanceKey { chain_id: CHAIN, token: TOKEN, owner }
    }

    fn units(n: u64) -> U256 {
        U256::from(n)
    }

    fn funds(n: u64) -> Account {
        Account::Funds(U256::from(n))
    }

    /// A fast follower; the TTL out of the way unless a test sets it.
    fn fast() -> ChainBalancesConfig {
        ChainBalancesConfig { ttl: Duration::from_secs(3600), poll: Duration::from_millis(20), ..Default::default() }
    }

    async fn start(config: ChainBalancesConfig) -> (Arc<FakeChain>, ChainBalances<FakeChain>) {
        let chain = Arc::new(FakeChain::new(CHAIN));
        chain.transfer(TOKEN, Address::ZERO, ALICE, units(100));
        chain.transfer(TOKEN, Address::ZERO, BOB, units(10));
        let balances = ChainBalances::new(chain.clone(), config);
        // Past the follower's first round, which re-reads whatever is cached.
        let deadline = Instant::now() + Duration::from_secs(5);
        while chain.head_reads() < 2 {
            assert!(Instant::now() < deadline, "the follower runs");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (chain, balances)
    }

    fn notifier() -> (Notifier, mpsc::UnboundedReceiver<(BalanceKey, Fetched)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Notifier::new(move |key, fetched| drop(tx.send((key, fetched)))), rx)
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<(BalanceKey, Fetched)>) -> (BalanceKey, Fetched) {
        tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("notified in time").unwrap()
    }

    /// Looks `owner` up and, on a miss, waits for the fetch.
    async fn fetch(balances: &ChainBalances<FakeChain>, owner: Address) -> Account {
        let (n, mut rx) = notifier();
        match balances.lookup(key(owner), &n) {
            Lookup::Known(balance) => balance,
            Lookup::Pending => next(&mut rx).await.1.unwrap(),
            Lookup::Unlimited => panic!("a chain balance is limited"),
        }
    }

    /// Waits until the chain has been asked for a balance since it had
    /// been asked `reads` times.
    async fn reading(chain: &FakeChain, reads: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while chain.balance_reads() == reads {
            assert!(Instant::now() < deadline, "the refresh reads");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Polls `owner`'s cached balance until it is `want`.
    async fn eventually(balances: &ChainBalances<FakeChain>, owner: Address, want: U256) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = fetch(balances, owner).await;
            if got == Account::Funds(want) {
                return;
            }
            assert!(Instant::now() < deadline, "{owner}: {got:?}, want {want}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A flood of new payers reads no more than `max_fetches` balances at
    /// once; the rest wait their turn and are answered all the same, and a
    /// read that cannot begin within the fetch timeout fails (its payments
    /// are told to retry) rather than wait without end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_new_payers_reads_a_bounded_number_of_balances_at_once() {
        let config = ChainBalancesConfig { max_fetches: 2, fetch_timeout: Duration::from_millis(300), ..fast() };
        let (chain, balances) = start(config).await;
        let reads = chain.balance_reads();
        chain.pause_balances(true);
        let (n, mut rx) = notifier();
        for i in 0..6u8 {
            assert_eq!(balances.lookup(key(Address::repeat_byte(0x10 + i)), &n), Lookup::Pending);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(chain.balance_reads() - reads, 2, "two reads at once");
        chain.pause_balances(false);
        let mut answered = 0;
        for _ in 0..6 {
            answered += usize::from(next(&mut rx).await.1.is_ok());
        }
        assert!(answered >= 2, "the reads that began are answered: {answered}");
        // With the node fast again, every new payer is read.
        for i in 0..6u8 {
            assert_eq!(fetch(&balances, Address::repeat_byte(0x10 + i)).await, funds(0));
        }
    }

    /// A flood of new payers holding every first-read place does not hold
    /// up the re-read of a known payer's balance after a transfer: it is
    /// read apart, and the payer is not served against tokens it moved.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_new_payers_does_not_hold_up_a_known_payers_re_read() {
        let config = ChainBalancesConfig { max_fetches: 2, fetch_timeout: Duration::from_secs(5), ..fast() };
        let (chain, balances) = start(config).await;
        assert_eq!(fetch(&balances, ALICE).await, funds(100));
        chain.pause_balances(true);
        let (n, _rx) = notifier();
        for i in 0..6u8 {
            assert_eq!(balances.lookup(key(Address::repeat_byte(0x10 + i)), &n), Lookup::Pending);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let reads = chain.balance_reads();
        chain.transfer(TOKEN, ALICE, CAROL, units(100));
        // The follower's re-read of ALICE starts though the first reads are all taken.
        let deadline = Instant::now() + Duration::from_secs(3);
        while chain.balance_reads() == reads {
            assert!(Instant::now() < deadline, "the re-read waited behind the flood");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        chain.pause_balances(false);
        eventually(&balances, ALICE, units(0)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_miss_fetches_once_for_everyone_then_answers_from_memory() {
        let (chain, balances) = start(fast()).await;
        chain.pause_balances(true);
        let (n, mut rx) = notifier();
        assert_eq!(balances.lookup(key(ALICE), &n), Lookup::Pending);
        assert_eq!(balances.lookup(key(ALICE), &n), Lookup::Pending, "joins the fetch in flight");
        chain.pause_balances(false);
        for _ in 0..2 {
            let (k, fetched) = next(&mut rx).await;
            assert_eq!((k, fetched.unwrap()), (key(ALICE), funds(100)));
        }
        assert_eq!(balances.lookup(key(ALICE), &n), Lookup::Known(funds(100)));
        assert_eq!(chain.balance_reads(), 1);
        assert_eq!(balances.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transfers_refresh_the_cached_owners_they_name() {
        let (chain, balances) = start(fast()).await;
        assert_eq!(fetch(&balances, ALICE).await, funds(100));
        assert_eq!(fetch(&balances, BOB).await, funds(10));
        chain.transfer(TOKEN, ALICE, BOB, units(30));
        eventually(&balances, ALICE, units(70)).await;
        eventually(&balances, BOB, units(40)).await;
        let reads = chain.balance_reads();
        // An owner not in the cache is not read.
        chain.transfer(TOKEN, Address::ZERO, CAROL, units(5));
        chain.transfer(TOKEN, Address::ZERO, ALICE, units(5));
        eventually(&balances, ALICE, units(75)).await;
        assert_eq!(chain.balance_reads(), reads + 1, "only Alice was read again");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transfer_during_a_fetch_reads_again_after_it() {
        let (chain, balances) = start(fast()).await;
        chain.pause_balances(true);
        let (n, mut rx) = notifier();
        assert_eq!(balances.lookup(key(ALICE), &n), Lookup::Pending);
        // The fetch has read 100; the transfer lands before it answers.
        let deadline = Instant::now() + Duration::from_secs(5);
        while chain.balance_reads() == 0 {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        chain.transfer(TOKEN, ALICE, BOB, units(60));
        // Let the follower see it while the fetch is still in flight.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !lock(&balances.shared.stripes[usize::from(ALICE[19]) % STRIPES])[&(TOKEN, ALICE)].dirty {
            assert!(Instant::now() < deadline, "the follower saw the transfer");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        chain.pause_balances(false);
        assert_eq!(next(&mut rx).await.1.unwrap(), funds(100), "the waiter gets what was read");
        eventually(&balances, ALICE, units(40)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn past_the_ttl_the_old_balance_is_served_while_it_is_read_again() {
        let ttl = Duration::from_millis(200);
        let (chain, balances) = start(ChainBalancesConfig { ttl, ..fast() }).await;
        assert_eq!(fetch(&balances, ALICE).await, funds(100));
        chain.set_silently(TOKEN, ALICE, units(55));
        assert_eq!(fetch(&balances, ALICE).await, funds(100), "fresh: no read");
        assert_eq!(chain.balance_reads(), 1);
        tokio::time::sleep(ttl).await;
        let (n, _rx) = notifier();
        assert_eq!(balances.lookup(key(ALICE), &n), Lookup::Known(funds(100)), "stale, served");
        eventually(&balances, ALICE, units(55)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_payer_that_gets_code_is_known_as_such_once_read_again() {
        let ttl = Duration::from_millis(200);
        let (chain, balances) = start(ChainBalancesConfig { ttl, ..fast() }).await;
        chain.set_code(BOB);
        assert_eq!(fetch(&balances, BOB).await, Account::Contract(units(10)), "read with the first balance");
        assert_eq!(fetch(&balances, ALICE).await, funds(100));
        // An EIP-7702 delegation moves no tokens: the TTL re-reads it.
        chain.set_code(ALICE);
        tokio::time::sleep(ttl).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while fetch(&balances, ALICE).await != Account::Contract(units(100)) {
            assert!(Instant::now() < deadline, "the code was never read again");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A refresh asked while a read is in flight is answered by a read
    /// that starts after it: the one in flight may predate a settlement.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refresh_is_answered_by_a_read_started_after_it() {
        let (chain, balances) = start(fast()).await;
        assert_eq!(fetch(&balances, ALICE).await, funds(100));
        let (first, mut first_rx) = notifier();
        let (second, mut second_rx) = notifier();
        chain.pause_balances(true);
        let reads = chain.balance_reads();
        assert!(balances.refresh(key(ALICE), &first));
        reading(&chain, reads).await;
        // That read has its value already; the balance moves after it.
        chain.set_silently(TOKEN, ALICE, units(55));
        assert!(balances.refresh(key(ALICE), &second));
        chain.pause_balances(false);
        assert_eq!(next(&mut first_rx).await.1.unwrap(), funds(100));
        assert_eq!(next(&mut second_rx).await.1.unwrap(), funds(55), "answered by the read after it");
        // Nothing cached: nothing to refresh.
        let (n, _rx) = notifier();
        assert!(!balances.refresh(key(Address::repeat_byte(0xee)), &n));
    }

    /// One notifier (a shard's) that refreshes twice, the second time while
    /// the first read is in flight, is answered by a read started after its
    /// second refresh only: an answer from the earlier read would release
    /// the second settlement's reservation on a balance read before it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_refresh_by_the_same_notifier_waits_for_a_read_after_it() {
        let (chain, balances) = start(fast()).await;
        assert_eq!(fetch(&balances, ALICE).await, funds(100));
        let (shard, mut rx) = notifier();
        chain.pause_balances(true);
        let reads = chain.balance_reads();
        assert!(balances.refresh(key(ALICE), &shard));
        reading(&chain, reads).await;
        chain.set_silently(TOKEN, ALICE, units(55));
        assert!(balances.refresh(key(ALICE), &shard));
        chain.pause_balances(false);
        assert_eq!(next(&mut rx).await.1.unwrap(), funds(55), "its first answer is a read after its second refresh");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_first_fetch_caches_nothing() {
        let (chain, balances) = start(fast()).await;
        chain.fail_balances(true);
        let (n, mut rx) = notifier();
        assert_eq!(balances.lookup(key(ALICE), &n), Lookup::Pending);
        let (k, fetched) = next(&mut rx).await;
        assert_eq!(k, key(ALICE));
        assert!(matches!(*fetched.unwrap_err(), Error::Chain(_)));
        assert!(balances.is_empty());
        chain.fail_balances(false);
        assert_eq!(balances.lookup(key(ALICE), &n), Lookup::Pending, "tried again");
        assert_eq!(next(&mut rx).await.1.unwrap(), funds(100));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_cache_keeps_the_most_recently_used_within_its_bound() {
        let (chain, balances) = start(ChainBalancesConfig { max_entries: 2, ..fast() }).await;
        chain.transfer(TOKEN, Address::ZERO, CAROL, units(7));
        let dave = Address::repeat_byte(0xda);
        for owner in [ALICE, BOB, CAROL, dave] {
            fetch(&balances, owner).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while balances.len() > 2 {
            assert!(Instant::now() < deadline, "{} entries", balances.len());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (n, _rx) = notifier();
        assert_eq!(balances.lookup(key(dave), &n), Lookup::Known(Account::Funds(U256::ZERO)));
        assert_eq!(balances.lookup(key(CAROL), &n), Lookup::Known(funds(7)));
        assert_eq!(balances.lookup(key(ALICE), &n), Lookup::Pending, "evicted");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_balances_are_dropped() {
        let (_chain, balances) = start(ChainBalancesConfig { idle: Duration::ZERO, ..fast() }).await;
        fetch(&balances, ALICE).await;
        // Sweeps run every few seconds when within the bound.
        balances.shared.sweep(Instant::now());
        assert!(balances.is_empty());
        assert!(lock(&balances.shared.tokens).is_empty(), "no token left to follow");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn far_behind_the_follower_forgets_the_cache() {
        let (chain, balances) = start(fast()).await;
        fetch(&balances, ALICE).await;
        chain.mine(MAX_LOG_RANGE + 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !balances.is_empty() {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn other_chains_ask_the_fallback() {
        let (chain, balances) = start(fast()).await;
        let (n, _rx) = notifier();
        assert_eq!(balances.lookup(BalanceKey { chain_id: 1, token: TOKEN, owner: ALICE }, &n), Lookup::Unlimited);
        let balances = balances.with_fallback(Arc::new(ConfiguredBalances::new(Some(units(5)))));
        assert_eq!(
            balances.lookup(BalanceKey { chain_id: 1, token: TOKEN, owner: ALICE }, &n),
            Lookup::Known(funds(5))
        );
        assert_eq!(chain.balance_reads(), 0);
    }
}
