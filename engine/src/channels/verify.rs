//! The stateless checks of a voucher (and of a deposit it carries): pure,
//! on a verifier thread.

use std::collections::HashMap;

use alloy::primitives::{Address, B256, Bytes, U256};
use secp256k1::PublicKey;
use x402_chain::{Eip3009Domain, ReceiveWithAuthorization};
use x402_channel::{ChannelConfig, ChannelDomain, Voucher};

use super::{DepositPayload, VoucherPayload};
use crate::{
    domain::{Merchant, Network, Requirements},
    ecdsa::{Signature, recover_signer},
    reason::{Reason, Refusal, Rejection},
};

/// Where the channel contracts are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelContracts {
    /// The channel contract.
    pub channels: Address,
    /// Its ERC-3009 deposit collector.
    pub collector: Address,
}

impl Default for ChannelContracts {
    fn default() -> Self {
        Self {
            channels: x402_chain::contracts::BATCH_SETTLEMENT_ADDRESS,
            collector: x402_chain::contracts::ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
        }
    }
}

/// What a chain's channels are held to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelTerms {
    /// Where its channel contract and deposit collector are.
    pub contracts: ChannelContracts,
    /// Deposits below this are refused (x402d pays the gas of each).
    pub min_deposit: u128,
    /// The receiver authorizer x402d claims with there, if it holds one: a
    /// channel naming another could never be claimed by x402d, and is
    /// refused. `None`: any.
    pub receiver_authorizer: Option<Address>,
}

/// A deposit whose authorization verified: what the channel contract's
/// `deposit` is called with.
#[derive(Clone, Debug)]
pub struct VerifiedDeposit {
    /// The deposit, in atomic token units.
    pub amount: u128,
    /// The ERC-3009 deposit collector the authorization pays.
    pub collector: Address,
    /// The collector's `collectorData`: the authorization's validity, salt and signature.
    pub collector_data: Bytes,
    /// The ERC-3009 nonce: spent once the deposit is on chain.
    pub nonce: B256,
}

/// A voucher that passed the stateless checks.
#[derive(Clone, Debug)]
pub struct VerifiedVoucher {
    /// The chain of the channel.
    pub chain_id: u64,
    /// The channel contract.
    pub contract: Address,
    /// The channel id: the hash of `config` in the contract's domain.
    pub channel_id: B256,
    /// The channel's config as the payer sent it.
    pub config: ChannelConfig,
    /// The voucher's cumulative `maxClaimableAmount`.
    pub max_claimable: u128,
    /// The voucher signer's signature, as sent.
    pub signature: Bytes,
    /// The EIP-712 digest of the voucher, which the signer signed.
    pub digest: B256,
    /// Why the signature does not recover to the voucher signer, when it
    /// does not: it is valid only if the signer is a contract (a wallet as
    /// `payerAuthorizer`, or the payer) whose ERC-1271 `isValidSignature`
    /// approves it, which the shard has proved on chain before anything
    /// else. `None` once recovered or proved.
    pub unproved: Option<String>,
    /// Its signature was proved on chain (ERC-1271): its signer is a
    /// contract, and that is not a reason to refuse its channel.
    pub proved: bool,
    /// The required amount: the voucher must be the charged total plus it.
    pub amount: u128,
    /// What is actually charged (≤ `amount`).
    pub charge: u128,
    /// A deposit to put on chain before the voucher is checked.
    pub deposit: Option<VerifiedDeposit>,
    /// A refund request of up to this much (`u128::MAX`: all not charged).
    pub refund: Option<u128>,
    /// Only check it (x402 `/verify`): nothing is recorded or sent.
    pub dry_run: bool,
}

/// Stage 1 for vouchers, owned by one verifier thread: the stateless checks
/// of a voucher against the requirements, in the order of the scheme
/// (scheme and network, the config against the requirements, the channel
/// id, then the signature).
///
/// It remembers, per channel, the config whose hash is the channel id and
/// the public key of the voucher signer. A later voucher of the channel
/// then costs a comparison of its config with the remembered one instead
/// of hashing it, its voucher digest with a cached domain separator, and an
/// ECDSA verification against the key instead of a recovery (see the
/// private `ecdsa` module).
#[derive(Debug)]
pub struct VoucherVerifier {
    /// The terms of a chain not in `chains` (a record-only verifier's, for any chain).
    any_chain: ChannelTerms,
    /// The chains channels are served on, with their terms; `None`: any
    /// chain, on `any_chain`'s.
    chains: Option<Vec<(u64, ChannelTerms)>>,
    /// The channel contract's EIP-712 domain, by chain id.
    domains: HashMap<u64, ChannelDomain>,
    known: KnownChannels,
    /// The chains this node settles; `None`: record only, any chain.
    settled_chains: Option<Vec<u64>>,
}

/// The channels a verifier thread remembers, in two generations: a channel
/// seen again moves to the recent one, and when the recent one is full the
/// older one is dropped. Channels in use stay known however many others
/// pass by; memory stays bounded at two generations.
#[derive(Debug)]
struct KnownChannels {
    generation: usize,
    recent: HashMap<B256, KnownChannel>,
    older: HashMap<B256, KnownChannel>,
}

impl KnownChannels {
    fn new(generation: usize) -> Self {
        Self { generation: generation.max(1), recent: HashMap::new(), older: HashMap::new() }
    }

    fn get(&mut self, id: &B256) -> Option<&KnownChannel> {
        if !self.recent.contains_key(id) {
            let channel = self.older.remove(id)?;
            self.insert(*id, channel);
        }
        self.recent.get(id)
    }

    fn insert(&mut self, id: B256, channel: KnownChannel) {
        if self.recent.len() >= self.generation && !self.recent.contains_key(&id) {
            self.older = std::mem::take(&mut self.recent);
        }
        self.recent.insert(id, channel);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.recent.len() + self.older.len()
    }
}

/// A channel whose id and signer key a verifier thread has established.
#[derive(Debug)]
struct KnownChannel {
    chain_id: u64,
    config: ChannelConfig,
    signer_key: PublicKey,
}

impl VoucherVerifier {
    /// Channels in a generation of the remembered ones: at most twice as
    /// many are remembered, about 250 bytes each.
    const GENERATION: usize = 32_768;

    /// A verifier of vouchers for the channel contract in `contracts`, on
    /// any chain, with no least deposit and any receiver authorizer.
    pub fn new(contracts: ChannelContracts) -> Self {
        Self {
            any_chain: ChannelTerms { contracts, ..ChannelTerms::default() },
            chains: None,
            domains: HashMap::new(),
            known: KnownChannels::new(Self::GENERATION),
            settled_chains: None,
        }
    }

    /// Serves channels on `chains` only (`None`: any chain), each on its
    /// terms: a voucher on another chain is refused (`invalid_network`).
    #[must_use]
    pub fn on_chains(mut self, chains: Option<Vec<(u64, ChannelTerms)>>) -> Self {
        self.chains = chains;
        self
    }

    /// The terms of `chain_id`'s channels, if they are served there.
    fn terms(&self, chain_id: u64) -> Option<ChannelTerms> {
        match &self.chains {
            None => Some(self.any_chain),
            Some(chains) => chains.iter().find(|(id, _)| *id == chain_id).map(|(_, terms)| *terms),
        }
    }

    /// Refuses vouchers on chains other than `chains` (`None`: any).
    pub fn settling(mut self, chains: Option<Vec<u64>>) -> Self {
        self.settled_chains = chains;
        self
    }

    /// Chains whose channel domain is kept at most (any chain id a voucher
    /// names, on a record-only node); past it the cache starts over.
    const MAX_DOMAINS: usize = 64;

    /// The channel contract's domain on `chain_id`, cached.
    fn domain(domains: &mut HashMap<u64, ChannelDomain>, chain_id: u64, contract: Address) -> &ChannelDomain {
        if !domains.contains_key(&chain_id) && domains.len() >= Self::MAX_DOMAINS {
            domains.clear();
        }
        domains.entry(chain_id).or_insert_with(|| ChannelDomain::new(chain_id, contract))
    }

    /// Checks `payload` for `merchant` against `requirements`.
    pub fn verify(
        &mut self,
        merchant: &Merchant,
        requirements: &Requirements,
        payload: VoucherPayload,
    ) -> Result<VerifiedVoucher, Refusal> {
        let reject = |reason, message: String| Refusal::Rejected {
            id: None,
            payer: None,
            rejection: Rejection::new(reason, message),
        };
        if requirements.scheme != "batch-settlement" {
            return Err(reject(
                Reason::Scheme,
                format!("scheme {:?} is not \"batch-settlement\"", requirements.scheme),
            ));
        }
        if payload.network != requirements.network {
            return Err(reject(
                Reason::NetworkMismatch,
                format!("payload network {:?} differs from required {:?}", payload.network, requirements.network),
            ));
        }
        let Some(network) = Network::parse(&requirements.network) else {
            return Err(reject(
                Reason::InvalidNetwork,
                format!("network {:?} is not an eip155 network", requirements.network),
            ));
        };
        let chain_id = network.chain_id();
        if let Err(message) = crate::verify::settles(self.settled_chains.as_deref(), network) {
            return Err(reject(Reason::InvalidNetwork, message));
        }
        let Some(terms) = self.terms(chain_id) else {
            let served: Vec<u64> = self.chains.iter().flatten().map(|(id, _)| *id).collect();
            return Err(reject(
                Reason::InvalidNetwork,
                format!("this node serves no batch-settlement channel on {network}: it serves them on {served:?}"),
            ));
        };
        let contracts = terms.contracts;
        let contract = contracts.channels;
        if !merchant.accepts(chain_id, requirements.asset) {
            return Err(reject(
                Reason::InvalidNetwork,
                format!("merchant does not accept token {} on {network}", requirements.asset),
            ));
        }
        let c = &payload.config;
        if c.token != requirements.asset {
            return Err(reject(
                Reason::TokenMismatch,
                format!("channel token {} is not asset {}", c.token, requirements.asset),
            ));
        }
        if c.receiver != requirements.pay_to || !merchant.pay_to.contains(&requirements.pay_to) {
            return Err(reject(
                Reason::ReceiverMismatch,
                format!(
                    "channel receiver {} is not payTo {} of merchant {:?}",
                    c.receiver, requirements.pay_to, merchant.id
                ),
            ));
        }
        if c.receiverAuthorizer != payload.extra.receiver_authorizer {
            return Err(reject(
                Reason::ReceiverAuthorizerMismatch,
                format!(
                    "channel receiverAuthorizer {} is not extra.receiverAuthorizer {}",
                    c.receiverAuthorizer, payload.extra.receiver_authorizer
                ),
            ));
        }
        if let Some(ours) = terms.receiver_authorizer
            && c.receiverAuthorizer != ours
        {
            return Err(reject(
                Reason::ReceiverAuthorizerMismatch,
                format!(
                    "channel receiverAuthorizer {} is not the one x402d claims with ({ours}): its vouchers could \
                     never be claimed",
                    c.receiverAuthorizer
                ),
            ));
        }
        if c.withdrawDelay.to::<u64>() != payload.extra.withdraw_delay {
            return Err(reject(
                Reason::WithdrawDelayMismatch,
                format!(
                    "channel withdrawDelay {} is not extra.withdrawDelay {}",
                    c.withdrawDelay, payload.extra.withdraw_delay
                ),
            ));
        }
        let domain = Self::domain(&mut self.domains, chain_id, contract);
        // A remembered channel with this very config: its id is the config's hash.
        let known = self
            .known
            .get(&payload.channel_id)
            .filter(|k| k.chain_id == chain_id && k.config == payload.config)
            .map(|k| k.signer_key);
        let id = match known {
            Some(_) => payload.channel_id,
            None => domain.channel_id(c),
        };
        if id != payload.channel_id {
            return Err(reject(
                Reason::ChannelIdMismatch,
                format!("voucher channel id {} is not the config's {id}", payload.channel_id),
            ));
        }
        let signer = voucher_signer(c);
        let digest = domain.voucher_digest(&Voucher { channelId: id, maxClaimableAmount: payload.max_claimable });
        let not_signed = |m: String| Refusal::Rejected {
            id: None,
            payer: Some(c.payer),
            rejection: Rejection::new(Reason::VoucherSignature, format!("voucher {m}")),
        };
        let parsed = <&[u8; 65]>::try_from(payload.signature.as_ref())
            .map_err(|_| format!("signature is {} bytes, not 65", payload.signature.len()))
            .and_then(Signature::parse);
        let mut unproved = None;
        match (known, parsed) {
            // A channel whose signer's key is known: an EOA, whose key alone signs.
            (Some(key), Ok(signature)) if signature.verify(digest, &key) => {}
            (Some(_), Ok(_)) => return Err(not_signed(format!("not signed by {signer}"))),
            (Some(_), Err(m)) => return Err(not_signed(m)),
            (None, parsed) => match parsed.and_then(|signature| signature.recover_as(digest, signer)) {
                Ok(signer_key) => {
                    self.known.insert(id, KnownChannel { chain_id, config: c.clone(), signer_key });
                }
                // Perhaps a contract signer's (ERC-1271): the chain says.
                Err(why) => unproved = Some(why),
            },
        }
        let amount: u128 = match payload.refund {
            // A refund charges nothing: its voucher is the charged total.
            Some(_) => 0,
            None => requirements.amount.try_into().map_err(|_| {
                reject(Reason::Value, format!("amount {} does not fit a uint128 voucher", requirements.amount))
            })?,
        };
        let deposit = match &payload.deposit {
            Some(d) if d.amount < terms.min_deposit => {
                return Err(reject(
                    Reason::DepositFailed,
                    format!("deposit {} is below this facilitator's minimum deposit {}", d.amount, terms.min_deposit),
                ));
            }
            Some(d) => Some(verify_deposit(requirements, chain_id, &payload.config, id, d, contracts.collector)?),
            None => None,
        };
        let charge = payload.charge.unwrap_or(amount);
        if charge > amount {
            return Err(Refusal::Invalid(crate::reason::InvalidField::new(
                "voucher.charge",
                format!("{charge} is above the required amount {amount}"),
            )));
        }
        Ok(VerifiedVoucher {
            chain_id,
            contract,
            channel_id: id,
            config: payload.config,
            max_claimable: payload.max_claimable,
            signature: payload.signature,
            digest,
            unproved,
            proved: false,
            amount,
            charge,
            deposit,
            refund: payload.refund.map(|r| r.unwrap_or(u128::MAX)),
            dry_run: false,
        })
    }
}

/// Who signs a channel's vouchers: its payer authorizer, or the payer when
/// there is none.
pub(crate) fn voucher_signer(config: &ChannelConfig) -> Address {
    if config.payerAuthorizer.is_zero() { config.payer } else { config.payerAuthorizer }
}

/// A deposit's authorization must be the payer's `ReceiveWithAuthorization`
/// of the amount to the collector, bound to this channel, in the token's
/// EIP-712 domain.
fn verify_deposit(
    requirements: &Requirements,
    chain_id: u64,
    config: &ChannelConfig,
    channel_id: B256,
    d: &DepositPayload,
    collector: Address,
) -> Result<VerifiedDeposit, Refusal> {
    let reject = |message: String| Refusal::Rejected {
        id: None,
        payer: Some(config.payer),
        rejection: Rejection::new(Reason::DepositSignature, message),
    };
    if requirements.eip712_name.is_empty() || requirements.eip712_version.is_empty() {
        return Err(Refusal::Rejected {
            id: None,
            payer: None,
            rejection: Rejection::new(Reason::MissingEip712Domain, "a deposit needs extra.name and extra.version"),
        });
    }
    let nonce = x402_chain::channel::deposit_nonce(channel_id, d.salt);
    let message = ReceiveWithAuthorization {
        from: config.payer,
        to: collector,
        value: U256::from(d.amount),
        validAfter: U256::from(d.valid_after),
        validBefore: U256::from(d.valid_before),
        nonce,
    };
    let domain = Eip3009Domain::new(&requirements.eip712_name, &requirements.eip712_version, chain_id, config.token);
    let digest = domain.signing_hash(&message);
    let signature = <&[u8; 65]>::try_from(d.signature.as_ref())
        .map_err(|_| reject(format!("deposit signature is {} bytes, not 65", d.signature.len())))?;
    let signer = recover_signer(signature, digest).map_err(reject)?;
    if signer != config.payer {
        return Err(reject(format!("deposit authorization signed by {signer}, not the payer {}", config.payer)));
    }
    Ok(VerifiedDeposit { amount: d.amount, collector, collector_data: collector_data(d), nonce })
}

/// The deposit collector's `collectorData` for the authorization of `d`.
fn collector_data(d: &DepositPayload) -> Bytes {
    x402_chain::channel::deposit_collector_data(
        U256::from(d.valid_after),
        U256::from(d.valid_before),
        d.salt,
        &d.signature,
    )
}

#[cfg(test)]
mod tests {
    use crate::domain::ChannelExtra;
    use alloy::primitives::address;
    use x402_devnet::Payer;

    use super::*;

    const TOKEN: Address = address!("0x5FbDB2315678afecb367f032d93F642f64180aa3");
    const PAY_TO: Address = address!("0x70997970C51812dc3A010C7d01b50e0d17dc79C8");
    const AUTHORIZER: Address = address!("0x00000000000000000000000000000000000000aa");

    fn merchant() -> Merchant {
        crate::testing::direct_merchant(PAY_TO)
    }

    fn requirements() -> Requirements {
        crate::testing::channel_requirements(TOKEN, PAY_TO)
    }

    fn domain() -> ChannelDomain {
        ChannelDomain::new(31337, ChannelContracts::default().channels)
    }

    #[test]
    fn the_channel_domain_cache_is_bounded_whatever_chains_vouchers_name() {
        let mut verifier = VoucherVerifier::new(ChannelContracts::default());
        let contract = ChannelContracts::default().channels;
        let config = Payer::random().channel_config(PAY_TO, AUTHORIZER, TOKEN, 900, B256::ZERO);
        for chain_id in 0..10 * VoucherVerifier::MAX_DOMAINS as u64 {
            let domain = VoucherVerifier::domain(&mut verifier.domains, chain_id, contract);
            assert_eq!(domain.channel_id(&config), ChannelDomain::new(chain_id, contract).channel_id(&config));
            assert!(verifier.domains.len() <= VoucherVerifier::MAX_DOMAINS);
        }
    }

    /// `payer`'s voucher of `max` on its channel with `salt`.
    fn voucher(payer: &Payer, salt: u8, max: u128) -> VoucherPayload {
        let config = payer.channel_config(PAY_TO, AUTHORIZER, TOKEN, 900, B256::repeat_byte(salt));
        let channel_id = domain().channel_id(&config);
        VoucherPayload {
            network: "eip155:31337".into(),
            config,
            channel_id,
            max_claimable: max,
            signature: payer.sign_voucher(&domain(), channel_id, max),
            charge: None,
            extra: ChannelExtra { receiver_authorizer: AUTHORIZER, withdraw_delay: 900 },
            deposit: None,
            refund: None,
        }
    }

    fn reason(refusal: Refusal) -> Reason {
        match refusal {
            Refusal::Rejected { rejection, .. } => rejection.reason,
            Refusal::Invalid(field) => panic!("invalid {field:?}"),
        }
    }

    #[test]
    fn a_known_channel_is_checked_against_the_remembered_config_and_key() {
        let (payer, stranger) = (Payer::random(), Payer::random());
        let mut verifier = VoucherVerifier::new(ChannelContracts::default());
        let check = |verifier: &mut VoucherVerifier, payload| verifier.verify(&merchant(), &requirements(), payload);

        // First voucher: the id is hashed and the key recovered, then remembered.
        let first = check(&mut verifier, voucher(&payer, 1, 10)).unwrap();
        assert_eq!(first.channel_id, voucher(&payer, 1, 10).channel_id);
        assert_eq!(verifier.known.len(), 1);
        assert_eq!(check(&mut verifier, voucher(&payer, 1, 20)).unwrap().max_claimable, 20);

        // The remembered id with another config (another salt) is the
        // config's id no more.
        let mut other_config = voucher(&payer, 1, 30);
        other_config.config.salt = B256::repeat_byte(2);
        assert_eq!(reason(check(&mut verifier, other_config).unwrap_err()), Reason::ChannelIdMismatch);

        // A signature by another key, or of another amount, fails against the key.
        let mut forged = voucher(&payer, 1, 30);
        forged.signature = stranger.sign_voucher(&domain(), forged.channel_id, 30);
        assert_eq!(reason(check(&mut verifier, forged).unwrap_err()), Reason::VoucherSignature);
        let mut replayed = voucher(&payer, 1, 30);
        replayed.max_claimable = 40;
        assert_eq!(reason(check(&mut verifier, replayed).unwrap_err()), Reason::VoucherSignature);

        // The same key on another chain is not the remembered channel.
        let mut elsewhere = requirements();
        elsewhere.network = "eip155:8453".into();
        let mut moved = voucher(&payer, 1, 30);
        moved.network = elsewhere.network.clone();
        assert_eq!(reason(verifier.verify(&merchant(), &elsewhere, moved).unwrap_err()), Reason::ChannelIdMismatch);
        assert_eq!(verifier.known.len(), 1);
    }

    #[test]
    fn channels_in_use_stay_known_while_others_pass_by() {
        let key = |byte: u8| KnownChannel {
            chain_id: u64::from(byte),
            config: voucher(&Payer::random(), 1, 1).config,
            signer_key: secp256k1::SecretKey::from_byte_array([byte + 1; 32]).unwrap().public_key(secp256k1::SECP256K1),
        };
        let mut known = KnownChannels::new(3);
        let id = B256::repeat_byte;
        known.insert(id(0), key(0));
        // Channel 0 is used while ten others are seen once each.
        for i in 1..=10 {
            known.insert(id(i), key(i));
            assert_eq!(known.get(&id(0)).map(|k| k.chain_id), Some(0), "after {i}");
            assert!(known.len() <= 6, "{}", known.len());
        }
        // The ones seen once and long ago are gone; the latest are there.
        assert!(known.get(&id(1)).is_none());
        assert_eq!(known.get(&id(10)).map(|k| k.chain_id), Some(10));
    }

    #[test]
    fn a_voucher_with_the_other_v_is_the_signers_and_is_claimed_with_the_right_one() {
        let payer = Payer::random();
        let right = voucher(&payer, 1, 10);
        let mut wrong_v = right.clone();
        let mut signature = wrong_v.signature.to_vec();
        signature[64] = 55 - signature[64];
        wrong_v.signature = signature.into();

        // Unknown channel (recovery) and known channel (verification) alike.
        let mut fresh = VoucherVerifier::new(ChannelContracts::default());
        fresh.verify(&merchant(), &requirements(), wrong_v.clone()).unwrap();
        fresh.verify(&merchant(), &requirements(), wrong_v.clone()).unwrap();

        let digest =
            domain().voucher_digest(&Voucher { channelId: right.channel_id, maxClaimableAmount: right.max_claimable });
        let claimable = crate::ecdsa::claimable(&wrong_v.signature, digest, voucher_signer(&right.config)).unwrap();
        assert_eq!(claimable.as_slice(), right.signature.as_ref());
    }
}
