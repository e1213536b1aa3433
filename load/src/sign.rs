//! Signing the load: `exact` payments and channel vouchers, as payers would.

use std::sync::atomic::{AtomicU64, Ordering};

use alloy::primitives::{Address, B256, U256};
use x402_channel::{ChannelConfig, ChannelDomain};
use x402_devnet::Payer;
use x402_proto::{
    encode::{exact_request, voucher_request},
    v1 as pb,
};
use x402_wire::{ChannelExtra, ExactPayload, FacilitatorRequest, Requirements, VoucherPayload};

/// Unix time in milliseconds.
fn unix_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `f(0..n)` on every core, in order.
fn par_map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism().map_or(2, |p| p.get()).min(n.max(1));
    let per = n.div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| scope.spawn(move || (t * per..((t + 1) * per).min(n)).map(f).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("signing threads do not panic")).collect()
    })
}

/// A nonce unique to payment `i` of this process at this millisecond.
fn nonce(i: u64) -> B256 {
    let mut nonce = [0u8; 32];
    nonce[..8].copy_from_slice(&i.to_be_bytes());
    nonce[8..16].copy_from_slice(&unix_millis().to_be_bytes());
    nonce[16..20].copy_from_slice(&std::process::id().to_be_bytes());
    B256::from(nonce)
}

fn now() -> u64 {
    unix_millis() / 1000
}

/// `n` `exact` payments of `requirements` from `payers` (round robin),
/// valid for the next hour, signed on every core.
pub fn exact_payloads(payers: &[Payer], requirements: &Requirements, n: usize) -> Vec<ExactPayload> {
    let now = now();
    par_map(n, |i| payers[i % payers.len()].sign_exact(requirements, now - 600, now + 3600, nonce(i as u64)))
}

/// `n` `exact` payments as `SubmitRequest`s (see [`exact_payloads`]).
pub fn sign(payers: &[Payer], requirements: &Requirements, n: usize) -> Vec<pb::SubmitRequest> {
    exact_payloads(payers, requirements, n)
        .into_iter()
        .enumerate()
        .map(|(i, payload)| exact_request(i as u64, requirements, &payload))
        .collect()
}

/// Signs one `exact` payment per call, valid from now for `ttl_secs`, as a
/// client paying as it goes would: for long runs at a fixed rate, where
/// payments signed ahead of time would all still be inside their validity
/// window (and the engine's replay window) at the end.
pub fn live_signer(
    payers: Vec<Payer>,
    requirements: Requirements,
    ttl_secs: u64,
) -> impl Fn() -> pb::SubmitRequest + Send + Sync + 'static {
    let count = AtomicU64::new(0);
    move || {
        let i = count.fetch_add(1, Ordering::Relaxed);
        let now = now();
        let payload = payers[i as usize % payers.len()].sign_exact(&requirements, now - 60, now + ttl_secs, nonce(i));
        exact_request(i, &requirements, &payload)
    }
}

/// Channels to open and pay through: `channels` of them, round robin over
/// the payers, each funded for `vouchers_per_channel` requests of `price`.
#[derive(Clone, Debug)]
pub struct ChannelPlan {
    /// The channel contract.
    pub domain: ChannelDomain,
    /// The ERC-3009 deposit collector.
    pub collector: Address,
    /// An `exact` requirement of the token: its network, address and
    /// EIP-712 domain, and the receiver (`pay_to`).
    pub token: Requirements,
    /// The receiver authorizer the channels name (the server's claim key).
    pub receiver_authorizer: Address,
    /// The channels' withdraw delay, seconds.
    pub withdraw_delay: u64,
    /// What one request costs, in the token's atomic units.
    pub price: u128,
    /// Channels to open.
    pub channels: usize,
    /// Vouchers each channel pays after its first request.
    pub vouchers_per_channel: usize,
}

/// The signed channel work of a [`ChannelPlan`].
#[derive(Debug)]
pub struct Vouchers {
    /// Each channel's first request, carrying its deposit: the setup.
    pub deposits: Vec<pb::SubmitRequest>,
    /// Each channel's following vouchers, in order.
    pub sequences: Vec<Vec<pb::SubmitRequest>>,
}

/// Signs `plan`'s deposits and vouchers on every core. Each run opens new
/// channels (random salts), so runs never collide with earlier ones.
pub fn vouchers(payers: &[Payer], plan: &ChannelPlan) -> Vouchers {
    let requirements =
        Requirements { scheme: "batch-settlement".into(), amount: U256::from(plan.price), ..plan.token.clone() };
    let extra = ChannelExtra { receiver_authorizer: plan.receiver_authorizer, withdraw_delay: plan.withdraw_delay };
    let per = plan.vouchers_per_channel + 1;
    // Channel `c`'s salt: this call's random prefix, then `c`.
    let run: [u8; 24] = rand::random();
    let salt = |c: usize| {
        let mut salt = [0u8; 32];
        salt[..24].copy_from_slice(&run);
        salt[24..].copy_from_slice(&(c as u64).to_be_bytes());
        B256::from(salt)
    };
    let signed = par_map(plan.channels * per, |i| {
        let (c, k) = (i / per, i % per);
        let payer = &payers[c % payers.len()];
        let config: ChannelConfig = payer.channel_config(
            plan.token.pay_to,
            plan.receiver_authorizer,
            plan.token.asset,
            plan.withdraw_delay,
            salt(c),
        );
        let id = plan.domain.channel_id(&config);
        let max = plan.price * (k as u128 + 1);
        let deposit = (k == 0).then(|| {
            payer.sign_deposit(
                &plan.token,
                plan.collector,
                id,
                plan.price * per as u128,
                now() + 3600,
                U256::from_be_bytes(nonce(c as u64).0),
            )
        });
        let payload = VoucherPayload {
            network: plan.token.network.clone(),
            config,
            channel_id: id,
            max_claimable: max,
            signature: payer.sign_voucher(&plan.domain, id, max),
            charge: None,
            extra,
            deposit,
            refund: None,
        };
        voucher_request(i as u64, &requirements, &payload)
    });
    let mut deposits = Vec::with_capacity(plan.channels);
    let mut sequences = Vec::with_capacity(plan.channels);
    let mut signed = signed.into_iter();
    for _ in 0..plan.channels {
        deposits.extend(signed.next());
        sequences.push(signed.by_ref().take(per - 1).collect());
    }
    Vouchers { deposits, sequences }
}

/// `/verify` bodies of `payments` (see [`exact_payloads`]).
pub fn verify_bodies(requirements: &Requirements, payments: &[ExactPayload]) -> Vec<Vec<u8>> {
    payments
        .iter()
        .map(|p| serde_json::to_vec(&FacilitatorRequest::exact(requirements, p)).expect("requests serialize"))
        .collect()
}
