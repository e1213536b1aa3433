//! The channel contract (`X402BatchSettlement`) and its ERC-3009 deposit
//! collector on anvil: deposits, vouchers and claims, refunds, withdrawals,
//! the signature and authorizer rules, and the decoders of its state reads.

use std::{cell::Cell, time::Duration};

use alloy::{
    contract::{CallBuilder, CallDecoder, Error as ContractError},
    network::EthereumWallet,
    primitives::{Address, B256, Bytes, U256, aliases::U40, keccak256},
    providers::{DynProvider, Provider, ProviderBuilder, ext::AnvilApi},
    rpc::types::TransactionReceipt,
    signers::{SignerSync, local::PrivateKeySigner},
    sol_types::{Revert, SolCall, SolEvent, SolValue},
};
use x402_channel::{ChannelDomain, ClaimBatch, ClaimEntry, Refund, Voucher};

use x402_chain::{
    Eip3009Domain, ReceiveWithAuthorization,
    contracts::{
        ERC3009DepositCollector,
        X402BatchSettlement::{self as C, X402BatchSettlementErrors as E, X402BatchSettlementInstance},
        X402TestToken::{self, X402TestTokenInstance},
    },
};
use x402_devnet::{self as devnet, Anvil, DEV_TOKEN_NAME, DEV_TOKEN_VERSION, Devnet};

/// Anvil's funded development accounts 1–6 (mnemonic "test test … junk").
const DEV_KEYS: [&str; 6] = [
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
    "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a",
    "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba",
    "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
];
/// Test tokens minted to each payer.
const MINT: u128 = 1_000_000_000;
/// The channels' withdraw delay: the contract's minimum, 15 minutes.
const DELAY: u64 = 900;
const THIRTY_DAYS: u64 = 30 * 24 * 3600;

/// A local chain with the token, the channel contract and its collector,
/// three funded payers, a receiver, its authorizer and a relayer.
struct Fixture {
    _anvil: Anvil,
    provider: DynProvider,
    devnet: Devnet,
    domain: ChannelDomain,
    token_domain: Eip3009Domain,
    channels: X402BatchSettlementInstance<DynProvider>,
    token: X402TestTokenInstance<DynProvider>,
    payers: [PrivateKeySigner; 3],
    receiver: PrivateKeySigner,
    authorizer: PrivateKeySigner,
    relayer: PrivateKeySigner,
    /// A key with no role and no ether: for wrong signatures.
    outsider: PrivateKeySigner,
    /// The next ERC-3009 deposit salt, so that every authorization nonce is fresh.
    salt: Cell<u64>,
}

impl Fixture {
    async fn new() -> Self {
        let anvil = Anvil::spawn(&[]).unwrap();
        let keys: Vec<PrivateKeySigner> = DEV_KEYS.iter().map(|k| k.parse().unwrap()).collect();
        let [a, b, c, receiver, authorizer, relayer] = <[PrivateKeySigner; 6]>::try_from(keys).unwrap();
        let payers = [a, b, c];
        let devnet =
            devnet::deploy(anvil.endpoint(), &payers.each_ref().map(PrivateKeySigner::address), U256::from(MINT))
                .await
                .unwrap();

        let mut wallet = EthereumWallet::from(relayer.clone());
        for key in payers.iter().chain([&receiver, &authorizer]) {
            wallet.register_signer(key.clone());
        }
        // Nonces are read from the node for every transaction: many calls
        // here are expected to revert in gas estimation, and a cached
        // nonce would skip one each time.
        let provider = ProviderBuilder::default()
            .with_gas_estimation()
            .with_simple_nonce_management()
            .fetch_chain_id()
            .wallet(wallet)
            .connect_http(anvil.endpoint().parse().unwrap())
            .erased();
        provider.client().set_poll_interval(Duration::from_millis(10));
        // The keys above are anvil's own accounts, so they have ether.
        let accounts = provider.get_accounts().await.unwrap();
        for key in payers.iter().chain([&receiver, &authorizer, &relayer]) {
            assert!(accounts.contains(&key.address()), "{} is not an anvil account", key.address());
        }

        Self {
            domain: ChannelDomain::new(devnet.chain_id, devnet.channels),
            token_domain: Eip3009Domain::new(DEV_TOKEN_NAME, DEV_TOKEN_VERSION, devnet.chain_id, devnet.token),
            channels: C::new(devnet.channels, provider.clone()),
            token: X402TestToken::new(devnet.token, provider.clone()),
            _anvil: anvil,
            provider,
            devnet,
            payers,
            receiver,
            authorizer,
            relayer,
            outsider: PrivateKeySigner::random(),
            salt: Cell::new(1),
        }
    }

    /// The config of payer `payer`'s channel number `salt` to the
    /// receiver, with the payer as its own authorizer.
    fn config(&self, payer: usize, salt: u8) -> C::ChannelConfig {
        let payer = self.payers[payer].address();
        x402_channel::ChannelConfig {
            payer,
            payerAuthorizer: payer,
            receiver: self.receiver.address(),
            receiverAuthorizer: self.authorizer.address(),
            token: self.devnet.token,
            withdrawDelay: U40::from(DELAY),
            salt: B256::repeat_byte(salt),
        }
        .into()
    }

    /// The channel id, as computed off chain.
    fn id(&self, c: &C::ChannelConfig) -> B256 {
        self.domain.channel_id(&c.clone().into())
    }

    /// The known key of `address`.
    fn key(&self, address: Address) -> &PrivateKeySigner {
        self.payers
            .iter()
            .chain([&self.receiver, &self.authorizer, &self.relayer, &self.outsider])
            .find(|k| k.address() == address)
            .unwrap_or_else(|| panic!("no key for {address}"))
    }

    /// `collectorData` for a deposit of `amount` into the channel `id`:
    /// the payer's `receiveWithAuthorization` to the collector, its nonce
    /// bound to `id` by a fresh salt.
    fn collector_data(&self, payer: &PrivateKeySigner, id: B256, amount: u128) -> Bytes {
        let salt = U256::from(self.salt.replace(self.salt.get() + 1));
        let (valid_after, valid_before) = (U256::ZERO, U256::from(u64::MAX));
        let message = ReceiveWithAuthorization {
            from: payer.address(),
            to: self.devnet.deposit_collector,
            value: U256::from(amount),
            validAfter: valid_after,
            validBefore: valid_before,
            nonce: keccak256((id, salt).abi_encode_params()),
        };
        let signature = sign(payer, self.token_domain.signing_hash(&message));
        (valid_after, valid_before, salt, signature).abi_encode_params().into()
    }

    /// `deposit(config, amount, collector, data)` sent by the relayer.
    fn deposit_call(
        &self,
        config: &C::ChannelConfig,
        amount: u128,
        data: Bytes,
    ) -> CallBuilder<&DynProvider, std::marker::PhantomData<C::depositCall>> {
        self.channels.deposit(config.clone(), amount, self.devnet.deposit_collector, data).from(self.relayer.address())
    }

    /// Deposits `amount` from the channel's payer, relayed.
    async fn deposit(&self, config: &C::ChannelConfig, amount: u128) -> TransactionReceipt {
        let data = self.collector_data(self.key(config.payer), self.id(config), amount);
        mined(self.deposit_call(config, amount, data)).await
    }

    /// The payer authorizer's (or, without one, the payer's) signature
    /// of a voucher for `max`.
    fn sign_voucher(&self, config: &C::ChannelConfig, max: u128) -> Bytes {
        let signer = if config.payerAuthorizer == Address::ZERO { config.payer } else { config.payerAuthorizer };
        self.sign_voucher_with(self.key(signer), config, max)
    }

    fn sign_voucher_with(&self, key: &PrivateKeySigner, config: &C::ChannelConfig, max: u128) -> Bytes {
        sign(key, self.domain.voucher_digest(&Voucher { channelId: self.id(config), maxClaimableAmount: max }))
    }

    /// A correctly signed voucher for `max`, claiming up to `total`.
    fn voucher_claim(&self, config: &C::ChannelConfig, max: u128, total: u128) -> C::VoucherClaim {
        C::VoucherClaim {
            voucher: C::Voucher { channel: config.clone(), maxClaimableAmount: max },
            signature: self.sign_voucher(config, max),
            totalClaimed: total,
        }
    }

    /// `key`'s `ClaimBatch` signature over `claims`.
    fn sign_claims(&self, key: &PrivateKeySigner, claims: &[C::VoucherClaim]) -> Bytes {
        sign(key, self.domain.claim_batch_digest(&self.claim_batch(claims)))
    }

    fn claim_batch(&self, claims: &[C::VoucherClaim]) -> ClaimBatch {
        ClaimBatch {
            claims: claims
                .iter()
                .map(|c| ClaimEntry {
                    channelId: self.id(&c.voucher.channel),
                    maxClaimableAmount: c.voucher.maxClaimableAmount,
                    totalClaimed: c.totalClaimed,
                })
                .collect(),
        }
    }

    /// `key`'s signature of a refund of `amount` at `nonce`.
    fn sign_refund(&self, key: &PrivateKeySigner, config: &C::ChannelConfig, nonce: u64, amount: u128) -> Bytes {
        sign(key, self.domain.refund_digest(&Refund { channelId: self.id(config), nonce: U256::from(nonce), amount }))
    }

    /// `channels(id)` as `(balance, totalClaimed)`.
    async fn state(&self, config: &C::ChannelConfig) -> (u128, u128) {
        let s = self.channels.channels(self.id(config)).call().await.unwrap();
        (s.balance, s.totalClaimed)
    }

    /// `receivers(receiver, token)` as `(totalClaimed, totalSettled)`.
    async fn receiver_state(&self) -> (u128, u128) {
        let s = self.channels.receivers(self.receiver.address(), self.devnet.token).call().await.unwrap();
        (s.totalClaimed, s.totalSettled)
    }

    /// `pendingWithdrawals(id)` as `(amount, initiatedAt)`.
    async fn pending(&self, config: &C::ChannelConfig) -> (u128, u64) {
        let w = self.channels.pendingWithdrawals(self.id(config)).call().await.unwrap();
        (w.amount, w.initiatedAt.to())
    }

    async fn refund_nonce(&self, config: &C::ChannelConfig) -> U256 {
        self.channels.refundNonce(self.id(config)).call().await.unwrap()
    }

    async fn balance(&self, owner: Address) -> u128 {
        self.token.balanceOf(owner).call().await.unwrap().to()
    }

    /// Mines an empty block with timestamp `at`.
    async fn mine_at(&self, at: u64) {
        self.provider.anvil_set_next_block_timestamp(at).await.unwrap();
        self.provider.evm_mine(None).await.unwrap();
        let latest = self.provider.get_block_number().await.unwrap();
        let block = self.provider.get_block_by_number(latest.into()).await.unwrap().unwrap();
        assert_eq!(block.header.timestamp, at);
    }

    /// The timestamp of the block a transaction was mined in.
    async fn timestamp(&self, receipt: &TransactionReceipt) -> u64 {
        let number = receipt.block_number.unwrap();
        self.provider.get_block_by_number(number.into()).await.unwrap().unwrap().header.timestamp
    }
}

/// A 65-byte `r ‖ s ‖ v` signature of `digest`, `v` as 27/28.
fn sign(key: &PrivateKeySigner, digest: B256) -> Bytes {
    key.sign_hash_sync(&digest).unwrap().as_bytes().into()
}

/// Sends `call` and waits for its successful receipt.
async fn mined<P: Provider, D: CallDecoder>(call: CallBuilder<P, D>) -> TransactionReceipt {
    let pending = match call.send().await {
        Ok(pending) => pending,
        Err(err) => panic!("transaction failed: {err} ({:?})", err.as_decoded_interface_error::<E>()),
    };
    let receipt = pending.get_receipt().await.unwrap();
    assert!(receipt.status(), "{receipt:?}");
    receipt
}

/// Sends `call`, which must revert (in gas estimation, before it is
/// mined), and returns the error.
async fn reverted<P: Provider, D: CallDecoder>(call: CallBuilder<P, D>) -> ContractError {
    match call.send().await {
        Ok(pending) => panic!("transaction {} did not revert", pending.tx_hash()),
        Err(err) => err,
    }
}

/// Sends `call`, which must revert with a channel contract error.
async fn fails<P: Provider, D: CallDecoder>(call: CallBuilder<P, D>) -> E {
    let err = reverted(call).await;
    err.as_decoded_interface_error::<E>().unwrap_or_else(|| panic!("not a channel contract error: {err}"))
}

/// The events `T` the channel contract emitted in `receipt`, in order.
fn events<T: SolEvent>(receipt: &TransactionReceipt) -> Vec<T> {
    receipt
        .logs()
        .iter()
        .filter(|log| log.address() == x402_chain::contracts::BATCH_SETTLEMENT_ADDRESS)
        .filter_map(|log| T::decode_log(&log.inner).ok().map(|l| l.data))
        .collect()
}

#[tokio::test]
async fn deposits_through_the_collector_and_digests_match() {
    let f = Fixture::new().await;
    let (payer, contract) = (f.payers[0].address(), f.devnet.channels);
    let config = f.config(0, 1);
    let id = f.id(&config);

    // The contract computes the same id and digests as the Rust code,
    // so the type strings and the domain agree.
    assert_eq!(f.channels.getChannelId(config.clone()).call().await.unwrap(), id);
    assert_eq!(
        f.channels.getVoucherDigest(id, 1234).call().await.unwrap(),
        f.domain.voucher_digest(&Voucher { channelId: id, maxClaimableAmount: 1234 })
    );
    assert_eq!(
        f.channels.getRefundDigest(id, U256::from(7), 99).call().await.unwrap(),
        f.domain.refund_digest(&Refund { channelId: id, nonce: U256::from(7), amount: 99 })
    );
    let other = f.config(1, 2);
    for claims in [
        vec![],
        vec![f.voucher_claim(&config, 500, 300)],
        vec![f.voucher_claim(&config, 500, 300), f.voucher_claim(&other, 70, 70)],
    ] {
        let digest = f.domain.claim_batch_digest(&f.claim_batch(&claims));
        assert_eq!(f.channels.getClaimBatchDigest(claims).call().await.unwrap(), digest);
    }

    // The first deposit creates the channel.
    let receipt = f.deposit(&config, 1000).await;
    assert_eq!(
        events::<C::ChannelCreated>(&receipt),
        vec![C::ChannelCreated { channelId: id, config: config.clone() }]
    );
    assert_eq!(
        events::<C::Deposited>(&receipt),
        vec![C::Deposited { channelId: id, sender: f.relayer.address(), amount: 1000, newBalance: 1000 }]
    );
    assert_eq!(f.state(&config).await, (1000, 0));
    assert_eq!(f.balance(payer).await, MINT - 1000);
    assert_eq!(f.balance(contract).await, 1000);
    assert_eq!(f.balance(f.devnet.deposit_collector).await, 0);

    // A second deposit adds to it.
    let receipt = f.deposit(&config, 250).await;
    assert!(events::<C::ChannelCreated>(&receipt).is_empty());
    assert_eq!(
        events::<C::Deposited>(&receipt),
        vec![C::Deposited { channelId: id, sender: f.relayer.address(), amount: 250, newBalance: 1250 }]
    );
    assert_eq!(f.state(&config).await, (1250, 0));
    assert_eq!(f.balance(payer).await, MINT - 1250);
    assert_eq!(f.balance(contract).await, 1250);

    // An authorization signed for another channel of the same payer
    // cannot fund this one: its nonce is bound to the other id.
    let elsewhere = f.config(0, 9);
    let data = f.collector_data(&f.payers[0], f.id(&elsewhere), 100);
    let err = reverted(f.deposit_call(&config, 100, data.clone())).await;
    assert_eq!(err.as_decoded_error::<Revert>().map(|r| r.reason), Some("FiatTokenV2: invalid signature".into()));
    assert_eq!(f.state(&config).await, (1250, 0));
    assert_eq!(f.balance(payer).await, MINT - 1250);
    // It funds the channel it was signed for.
    mined(f.deposit_call(&elsewhere, 100, data.clone())).await;
    assert_eq!(f.state(&elsewhere).await, (100, 0));
    assert_eq!(f.balance(payer).await, MINT - 1350);
    // And only once.
    let err = reverted(f.deposit_call(&elsewhere, 100, data)).await;
    assert_eq!(
        err.as_decoded_error::<Revert>().map(|r| r.reason),
        Some("FiatTokenV2: authorization is used or canceled".into())
    );

    // Only the channel contract may use the collector.
    let collector = ERC3009DepositCollector::new(f.devnet.deposit_collector, &f.provider);
    let data = f.collector_data(&f.payers[0], id, 100);
    let err =
        reverted(collector.collect(payer, f.devnet.token, U256::from(100), id, data).from(f.relayer.address())).await;
    assert!(err.as_decoded_error::<ERC3009DepositCollector::OnlySettlement>().is_some(), "{err}");
    assert_eq!(f.balance(payer).await, MINT - 1350);
}

#[tokio::test]
async fn receiver_claims_vouchers() {
    let f = Fixture::new().await;
    let receiver = f.receiver.address();
    let config = f.config(0, 1);
    let id = f.id(&config);
    f.deposit(&config, 1000).await;

    // The receiver claims 200 under a voucher for 300.
    let receipt = mined(f.channels.claim(vec![f.voucher_claim(&config, 300, 200)]).from(receiver)).await;
    assert_eq!(
        events::<C::Claimed>(&receipt),
        vec![C::Claimed { channelId: id, sender: receiver, claimAmount: 200, newTotalClaimed: 200 }]
    );
    assert_eq!(f.state(&config).await, (1000, 200));
    assert_eq!(f.receiver_state().await, (200, 0));
    // The receiver authorizer may claim too; the claim is the delta.
    let receipt = mined(f.channels.claim(vec![f.voucher_claim(&config, 300, 300)]).from(f.authorizer.address())).await;
    assert_eq!(
        events::<C::Claimed>(&receipt),
        vec![C::Claimed { channelId: id, sender: f.authorizer.address(), claimAmount: 100, newTotalClaimed: 300 }]
    );
    assert_eq!(f.state(&config).await, (1000, 300));
    assert_eq!(f.receiver_state().await, (300, 0));

    // Nobody else may.
    let claim = f.channels.claim(vec![f.voucher_claim(&config, 400, 400)]).from(f.relayer.address());
    assert_eq!(fails(claim).await, E::NotReceiver(C::NotReceiver { channelId: id }));
    let claim = f.channels.claim(vec![f.voucher_claim(&config, 400, 400)]).from(f.payers[0].address());
    assert_eq!(fails(claim).await, E::NotReceiver(C::NotReceiver { channelId: id }));

    // A voucher signed by someone else, or for another amount, is refused.
    let mut forged = f.voucher_claim(&config, 400, 400);
    forged.signature = f.sign_voucher_with(&f.outsider, &config, 400);
    let claim = f.channels.claim(vec![forged]).from(receiver);
    assert_eq!(fails(claim).await, E::InvalidVoucherSignature(C::InvalidVoucherSignature { channelId: id }));
    let mut raised = f.voucher_claim(&config, 400, 400);
    raised.voucher.maxClaimableAmount = 900;
    let claim = f.channels.claim(vec![raised]).from(receiver);
    assert_eq!(fails(claim).await, E::InvalidVoucherSignature(C::InvalidVoucherSignature { channelId: id }));

    // Above the voucher, above the balance.
    let claim = f.channels.claim(vec![f.voucher_claim(&config, 500, 600)]).from(receiver);
    assert_eq!(
        fails(claim).await,
        E::ClaimAboveVoucher(C::ClaimAboveVoucher { channelId: id, totalClaimed: 600, maxClaimableAmount: 500 })
    );
    let claim = f.channels.claim(vec![f.voucher_claim(&config, 1500, 1200)]).from(receiver);
    assert_eq!(
        fails(claim).await,
        E::ClaimAboveBalance(C::ClaimAboveBalance { channelId: id, totalClaimed: 1200, balance: 1000 })
    );
    // One bad row fails the whole claim.
    let claim =
        f.channels.claim(vec![f.voucher_claim(&config, 400, 400), f.voucher_claim(&config, 1500, 1200)]).from(receiver);
    assert!(matches!(fails(claim).await, E::ClaimAboveBalance(_)));
    assert_eq!(f.state(&config).await, (1000, 300));

    // Replaying the latest or an older voucher is a harmless no-op.
    for (max, total) in [(300, 300), (300, 200), (200, 200)] {
        let receipt = mined(f.channels.claim(vec![f.voucher_claim(&config, max, total)]).from(receiver)).await;
        assert!(events::<C::Claimed>(&receipt).is_empty(), "{max}/{total}");
        assert_eq!(f.state(&config).await, (1000, 300));
        assert_eq!(f.receiver_state().await, (300, 0));
    }

    assert_eq!(fails(f.channels.claim(vec![]).from(receiver)).await, E::EmptyClaims(C::EmptyClaims {}));
    let claim = f.channels.claimWithSignature(vec![], Bytes::new()).from(receiver);
    assert_eq!(fails(claim).await, E::EmptyClaims(C::EmptyClaims {}));

    // A channel with a separate payer authorizer takes its signature,
    // not the payer's; one without takes the payer's.
    let mut delegated = f.config(1, 2);
    delegated.payerAuthorizer = f.outsider.address();
    let mut direct = f.config(2, 3);
    direct.payerAuthorizer = Address::ZERO;
    f.deposit(&delegated, 100).await;
    f.deposit(&direct, 100).await;
    let mut by_payer = f.voucher_claim(&delegated, 50, 50);
    by_payer.signature = f.sign_voucher_with(&f.payers[1], &delegated, 50);
    let claim = f.channels.claim(vec![by_payer]).from(receiver);
    assert_eq!(
        fails(claim).await,
        E::InvalidVoucherSignature(C::InvalidVoucherSignature { channelId: f.id(&delegated) })
    );
    let receipt = mined(
        f.channels.claim(vec![f.voucher_claim(&delegated, 50, 50), f.voucher_claim(&direct, 60, 60)]).from(receiver),
    )
    .await;
    assert_eq!(events::<C::Claimed>(&receipt).len(), 2);
    assert_eq!(f.state(&delegated).await, (100, 50));
    assert_eq!(f.state(&direct).await, (100, 60));
    assert_eq!(f.receiver_state().await, (410, 0));
    // Claims only account: nothing is paid until `settle`.
    assert_eq!(f.balance(receiver).await, 0);
    assert_eq!(f.balance(f.devnet.channels).await, 1200);
}

#[tokio::test]
async fn relayed_claims_across_channels_then_settle() {
    let f = Fixture::new().await;
    let (receiver, token, relayer) = (f.receiver.address(), f.devnet.token, f.relayer.address());
    let configs = [f.config(0, 1), f.config(1, 1), f.config(2, 1)];
    for (config, amount) in configs.iter().zip([1000, 2000, 3000]) {
        f.deposit(config, amount).await;
    }

    // One authorizer signature covers rows of three payers' channels;
    // a third party relays it.
    let claims: Vec<_> =
        configs.iter().zip([(100, 100), (200, 150), (300, 300)]).map(|(c, (m, t))| f.voucher_claim(c, m, t)).collect();
    let signature = f.sign_claims(&f.authorizer, &claims);
    let receipt = mined(f.channels.claimWithSignature(claims.clone(), signature.clone()).from(relayer)).await;
    let expected: Vec<_> = configs
        .iter()
        .zip([100, 150, 300])
        .map(|(c, t)| C::Claimed { channelId: f.id(c), sender: relayer, claimAmount: t, newTotalClaimed: t })
        .collect();
    assert_eq!(events::<C::Claimed>(&receipt), expected);
    assert_eq!(f.state(&configs[0]).await, (1000, 100));
    assert_eq!(f.state(&configs[1]).await, (2000, 150));
    assert_eq!(f.state(&configs[2]).await, (3000, 300));
    assert_eq!(f.receiver_state().await, (550, 0));
    assert_eq!(f.balance(receiver).await, 0);
    // Relaying the same batch again changes nothing.
    let receipt = mined(f.channels.claimWithSignature(claims.clone(), signature).from(relayer)).await;
    assert!(events::<C::Claimed>(&receipt).is_empty());
    assert_eq!(f.receiver_state().await, (550, 0));

    // Anyone settles: one transfer of the exact sum.
    let receipt = mined(f.channels.settle(receiver, token).from(relayer)).await;
    assert_eq!(events::<C::Settled>(&receipt), vec![C::Settled { receiver, token, sender: relayer, amount: 550 }]);
    assert_eq!(f.balance(receiver).await, 550);
    assert_eq!(f.balance(f.devnet.channels).await, 6000 - 550);
    assert_eq!(f.receiver_state().await, (550, 550));
    // A second settle has nothing to pay.
    let receipt = mined(f.channels.settle(receiver, token).from(relayer)).await;
    assert!(events::<C::Settled>(&receipt).is_empty());
    assert_eq!(f.balance(receiver).await, 550);
    assert_eq!(f.receiver_state().await, (550, 550));

    // The batch must be signed by the rows' receiver authorizer, over
    // exactly these rows.
    let claims: Vec<_> = configs.iter().map(|c| f.voucher_claim(c, 400, 400)).collect();
    let call = f.channels.claimWithSignature(claims.clone(), f.sign_claims(&f.receiver, &claims)).from(relayer);
    assert_eq!(fails(call).await, E::InvalidAuthorizerSignature(C::InvalidAuthorizerSignature {}));
    let mut tampered = claims.clone();
    tampered[1].totalClaimed = 390;
    let call = f.channels.claimWithSignature(tampered, f.sign_claims(&f.authorizer, &claims)).from(relayer);
    assert_eq!(fails(call).await, E::InvalidAuthorizerSignature(C::InvalidAuthorizerSignature {}));

    // All rows must share one (non-zero) receiver authorizer.
    let mut foreign = f.config(0, 2);
    foreign.receiverAuthorizer = f.outsider.address();
    let mixed = vec![claims[0].clone(), f.voucher_claim(&foreign, 10, 10)];
    let call = f.channels.claimWithSignature(mixed.clone(), f.sign_claims(&f.authorizer, &mixed)).from(relayer);
    assert_eq!(
        fails(call).await,
        E::ReceiverAuthorizerMismatch(C::ReceiverAuthorizerMismatch { channelId: f.id(&foreign) })
    );
    let mut unauthorized = f.config(0, 3);
    unauthorized.receiverAuthorizer = Address::ZERO;
    let rows = vec![f.voucher_claim(&unauthorized, 10, 10)];
    let call = f.channels.claimWithSignature(rows.clone(), f.sign_claims(&f.authorizer, &rows)).from(relayer);
    assert_eq!(
        fails(call).await,
        E::ReceiverAuthorizerMismatch(C::ReceiverAuthorizerMismatch { channelId: f.id(&unauthorized) })
    );
    assert_eq!(f.receiver_state().await, (550, 550));

    // Claim and settle in one transaction through the contract's multicall.
    let signature = f.sign_claims(&f.authorizer, &claims);
    let calls: Vec<Bytes> = vec![
        C::claimWithSignatureCall { voucherClaims: claims, authorizerSignature: signature }.abi_encode().into(),
        C::settleCall { receiver, token }.abi_encode().into(),
    ];
    let receipt = mined(f.channels.multicall(calls).from(relayer)).await;
    assert_eq!(events::<C::Claimed>(&receipt).iter().map(|e| e.claimAmount).collect::<Vec<_>>(), [300, 250, 100]);
    assert_eq!(events::<C::Settled>(&receipt), vec![C::Settled { receiver, token, sender: relayer, amount: 650 }]);
    assert_eq!(f.receiver_state().await, (1200, 1200));
    assert_eq!(f.balance(receiver).await, 1200);
    assert_eq!(f.balance(f.devnet.channels).await, 6000 - 1200);
    for config in &configs {
        assert_eq!(f.state(config).await.1, 400);
    }
}

#[tokio::test]
async fn refunds_return_the_unclaimed_remainder() {
    let f = Fixture::new().await;
    let (payer, receiver, relayer) = (f.payers[0].address(), f.receiver.address(), f.relayer.address());
    let config = f.config(0, 1);
    let id = f.id(&config);
    f.deposit(&config, 1000).await;
    mined(f.channels.claim(vec![f.voucher_claim(&config, 300, 300)]).from(receiver)).await;

    // Only the receiver (or its authorizer) refunds directly.
    let call = f.channels.refund(config.clone(), 100).from(relayer);
    assert_eq!(fails(call).await, E::NotReceiver(C::NotReceiver { channelId: id }));
    let call = f.channels.refund(config.clone(), 100).from(payer);
    assert_eq!(fails(call).await, E::NotReceiver(C::NotReceiver { channelId: id }));

    let receipt = mined(f.channels.refund(config.clone(), 200).from(receiver)).await;
    assert_eq!(events::<C::Refunded>(&receipt), vec![C::Refunded { channelId: id, sender: receiver, amount: 200 }]);
    assert!(events::<C::ChannelClosed>(&receipt).is_empty());
    assert_eq!(f.state(&config).await, (800, 300));
    assert_eq!(f.refund_nonce(&config).await, U256::from(1));
    assert_eq!(f.balance(payer).await, MINT - 1000 + 200);
    assert_eq!(f.balance(f.devnet.channels).await, 800);

    // A signed refund anyone relays, at the current nonce.
    let signature = f.sign_refund(&f.authorizer, &config, 1, 100);
    let call = f.channels.refundWithSignature(config.clone(), 100, U256::from(1), signature.clone());
    let receipt = mined(call.from(relayer)).await;
    assert_eq!(events::<C::Refunded>(&receipt), vec![C::Refunded { channelId: id, sender: relayer, amount: 100 }]);
    assert_eq!(f.state(&config).await, (700, 300));
    assert_eq!(f.refund_nonce(&config).await, U256::from(2));
    assert_eq!(f.balance(payer).await, MINT - 1000 + 300);
    // It cannot be replayed: the nonce moved on.
    let call = f.channels.refundWithSignature(config.clone(), 100, U256::from(1), signature).from(relayer);
    assert_eq!(
        fails(call).await,
        E::InvalidRefundNonce(C::InvalidRefundNonce { channelId: id, expected: U256::from(2), given: U256::from(1) })
    );
    // Signed by someone else, or for another amount.
    let call = f
        .channels
        .refundWithSignature(config.clone(), 100, U256::from(2), f.sign_refund(&f.receiver, &config, 2, 100))
        .from(relayer);
    assert_eq!(fails(call).await, E::InvalidRefundSignature(C::InvalidRefundSignature { channelId: id }));
    let call = f
        .channels
        .refundWithSignature(config.clone(), 150, U256::from(2), f.sign_refund(&f.authorizer, &config, 2, 100))
        .from(relayer);
    assert_eq!(fails(call).await, E::InvalidRefundSignature(C::InvalidRefundSignature { channelId: id }));
    assert_eq!(f.state(&config).await, (700, 300));
    assert_eq!(f.refund_nonce(&config).await, U256::from(2));

    // Asking for more than is unclaimed returns what is unclaimed and
    // closes the channel; claimed value stays for the receiver.
    let receipt = mined(f.channels.refund(config.clone(), 10_000).from(f.authorizer.address())).await;
    assert_eq!(
        events::<C::Refunded>(&receipt),
        vec![C::Refunded { channelId: id, sender: f.authorizer.address(), amount: 400 }]
    );
    assert_eq!(events::<C::ChannelClosed>(&receipt), vec![C::ChannelClosed { channelId: id, config: config.clone() }]);
    assert_eq!(f.state(&config).await, (300, 300));
    assert_eq!(f.refund_nonce(&config).await, U256::from(3));
    assert_eq!(f.balance(payer).await, MINT - 300);
    assert_eq!(f.balance(f.devnet.channels).await, 300);

    // Nothing left to refund: nothing moves, but the nonce still increments.
    let receipt = mined(f.channels.refund(config.clone(), 50).from(receiver)).await;
    assert_eq!(events::<C::Refunded>(&receipt), vec![C::Refunded { channelId: id, sender: receiver, amount: 0 }]);
    assert!(events::<C::ChannelClosed>(&receipt).is_empty());
    assert_eq!(f.refund_nonce(&config).await, U256::from(4));
    let signature = f.sign_refund(&f.authorizer, &config, 4, 50);
    mined(f.channels.refundWithSignature(config.clone(), 50, U256::from(4), signature).from(relayer)).await;
    assert_eq!(f.refund_nonce(&config).await, U256::from(5));
    assert_eq!(f.state(&config).await, (300, 300));
    assert_eq!(f.balance(payer).await, MINT - 300);

    // The claimed 300 is still the receiver's.
    mined(f.channels.settle(receiver, f.devnet.token).from(relayer)).await;
    assert_eq!(f.balance(receiver).await, 300);
    assert_eq!(f.balance(f.devnet.channels).await, 0);
}

#[tokio::test]
async fn payer_withdraws_after_the_delay() {
    let f = Fixture::new().await;
    let (payer, receiver, relayer) = (f.payers[0].address(), f.receiver.address(), f.relayer.address());
    let config = f.config(0, 1);
    let id = f.id(&config);
    f.deposit(&config, 1000).await;
    mined(f.channels.claim(vec![f.voucher_claim(&config, 100, 100)]).from(receiver)).await;

    let call = f.channels.initiateWithdraw(config.clone(), 2000).from(receiver);
    assert_eq!(fails(call).await, E::NotPayer(C::NotPayer { channelId: id }));
    let call = f.channels.initiateWithdraw(config.clone(), 0).from(payer);
    assert_eq!(fails(call).await, E::ZeroAmount(C::ZeroAmount {}));
    let call = f.channels.finalizeWithdraw(config.clone()).from(payer);
    assert_eq!(fails(call).await, E::NoPendingWithdrawal(C::NoPendingWithdrawal { channelId: id }));

    // The payer asks for more than is left; it will get the unclaimed remainder.
    let receipt = mined(f.channels.initiateWithdraw(config.clone(), 2000).from(payer)).await;
    let initiated_at = f.timestamp(&receipt).await;
    let finalize_after = initiated_at + DELAY;
    assert_eq!(
        events::<C::WithdrawInitiated>(&receipt),
        vec![C::WithdrawInitiated { channelId: id, amount: 2000, finalizeAfter: U40::from(finalize_after) }]
    );
    assert_eq!(f.pending(&config).await, (2000, initiated_at));
    let call = f.channels.initiateWithdraw(config.clone(), 10).from(payer);
    assert_eq!(fails(call).await, E::WithdrawalAlreadyPending(C::WithdrawalAlreadyPending { channelId: id }));

    // The receiver claims its latest voucher during the delay.
    mined(f.channels.claim(vec![f.voucher_claim(&config, 400, 400)]).from(receiver)).await;
    assert_eq!(f.state(&config).await, (1000, 400));

    // Not a second early. (Anvil runs calls and gas estimates on the
    // latest block, so each step mines a block at the instant tested.)
    f.mine_at(finalize_after - 1).await;
    let call = f.channels.finalizeWithdraw(config.clone()).from(payer);
    assert_eq!(
        fails(call).await,
        E::WithdrawDelayNotElapsed(C::WithdrawDelayNotElapsed {
            channelId: id,
            finalizeAfter: U40::from(finalize_after)
        })
    );
    f.mine_at(finalize_after).await;
    // Only the payer finalizes.
    let call = f.channels.finalizeWithdraw(config.clone()).from(receiver);
    assert_eq!(fails(call).await, E::NotPayer(C::NotPayer { channelId: id }));

    let receipt = mined(f.channels.finalizeWithdraw(config.clone()).from(payer)).await;
    assert!(f.timestamp(&receipt).await >= finalize_after);
    assert_eq!(
        events::<C::WithdrawFinalized>(&receipt),
        vec![C::WithdrawFinalized { channelId: id, sender: payer, amount: 600 }]
    );
    assert_eq!(events::<C::ChannelClosed>(&receipt), vec![C::ChannelClosed { channelId: id, config: config.clone() }]);
    assert_eq!(f.state(&config).await, (400, 400));
    assert_eq!(f.pending(&config).await, (0, 0));
    assert_eq!(f.balance(payer).await, MINT - 1000 + 600);
    assert_eq!(f.balance(f.devnet.channels).await, 400);
    let call = f.channels.finalizeWithdraw(config.clone()).from(payer);
    assert_eq!(fails(call).await, E::NoPendingWithdrawal(C::NoPendingWithdrawal { channelId: id }));

    // A voucher not claimed in time is lost to the receiver; what it
    // claimed is paid.
    let call = f.channels.claim(vec![f.voucher_claim(&config, 500, 500)]).from(receiver);
    assert_eq!(
        fails(call).await,
        E::ClaimAboveBalance(C::ClaimAboveBalance { channelId: id, totalClaimed: 500, balance: 400 })
    );
    mined(f.channels.settle(receiver, f.devnet.token).from(relayer)).await;
    assert_eq!(f.balance(receiver).await, 400);
    assert_eq!(f.balance(f.devnet.channels).await, 0);

    // A partial withdrawal leaves the channel open.
    let partial = f.config(1, 1);
    f.deposit(&partial, 1000).await;
    mined(f.channels.initiateWithdraw(partial.clone(), 300).from(f.payers[1].address())).await;
    f.provider.anvil_increase_time(DELAY).await.unwrap();
    f.provider.evm_mine(None).await.unwrap();
    let receipt = mined(f.channels.finalizeWithdraw(partial.clone()).from(f.payers[1].address())).await;
    assert_eq!(
        events::<C::WithdrawFinalized>(&receipt),
        vec![C::WithdrawFinalized { channelId: f.id(&partial), sender: f.payers[1].address(), amount: 300 }]
    );
    assert!(events::<C::ChannelClosed>(&receipt).is_empty());
    assert_eq!(f.state(&partial).await, (700, 0));
    assert_eq!(f.balance(f.payers[1].address()).await, MINT - 700);
}

#[tokio::test]
async fn deposits_are_validated() {
    let f = Fixture::new().await;
    let data = |config: &C::ChannelConfig| f.collector_data(&f.payers[0], f.id(config), 100);

    for delay in [DELAY - 1, THIRTY_DAYS + 1, 0] {
        let mut config = f.config(0, 1);
        config.withdrawDelay = U40::from(delay);
        let call = f.deposit_call(&config, 100, data(&config));
        assert_eq!(fails(call).await, E::InvalidWithdrawDelay(C::InvalidWithdrawDelay {}), "{delay}");
    }
    let config = f.config(0, 1);
    assert_eq!(fails(f.deposit_call(&config, 0, data(&config))).await, E::ZeroAmount(C::ZeroAmount {}));
    let mut nobody = f.config(0, 1);
    nobody.receiver = Address::ZERO;
    let call = f.deposit_call(&nobody, 100, data(&nobody));
    assert_eq!(fails(call).await, E::InvalidChannelConfig(C::InvalidChannelConfig {}));
    assert_eq!(f.balance(f.payers[0].address()).await, MINT);

    // Both bounds are allowed.
    for (salt, delay) in [(2, DELAY), (3, THIRTY_DAYS)] {
        let mut config = f.config(0, salt);
        config.withdrawDelay = U40::from(delay);
        f.deposit(&config, 100).await;
        assert_eq!(f.state(&config).await, (100, 0));
    }
    assert_eq!(f.balance(f.payers[0].address()).await, MINT - 200);
}

#[tokio::test]
async fn states_of_many_channels_read_in_one_call() {
    use x402_chain::channel::{decode_state, decode_states, state_calldata, states_calldata};
    let f = Fixture::new().await;
    let receiver = f.receiver.address();
    // Claimed and partly refunded; a withdrawal pending; never opened.
    let (refunded, withdrawing, unknown) = (f.config(0, 1), f.config(1, 1), f.config(2, 1));
    f.deposit(&refunded, 1000).await;
    mined(f.channels.claim(vec![f.voucher_claim(&refunded, 300, 300)]).from(receiver)).await;
    mined(f.channels.refund(refunded.clone(), 200).from(receiver)).await;
    f.deposit(&withdrawing, 500).await;
    let receipt = mined(f.channels.initiateWithdraw(withdrawing.clone(), 100).from(f.payers[1].address())).await;
    let initiated_at = f.timestamp(&receipt).await;

    let call = |input: Bytes| {
        let provider = f.provider.clone();
        let request = alloy::rpc::types::TransactionRequest::default().to(f.devnet.channels).input(input.into());
        async move { provider.call(request).await.unwrap() }
    };
    let ids = [f.id(&refunded), f.id(&withdrawing), f.id(&unknown)];
    let states = decode_states(&call(states_calldata(&ids)).await, &[DELAY, DELAY, 7]).unwrap();
    let [refunded_state, withdrawing_state, unknown_state] = states.as_slice() else { panic!("{states:?}") };
    assert_eq!((refunded_state.balance, refunded_state.total_claimed, refunded_state.refund_nonce), (800, 300, 1));
    assert_eq!(refunded_state.withdrawal, None);
    assert_eq!((withdrawing_state.balance, withdrawing_state.total_claimed), (500, 0));
    let withdrawal = withdrawing_state.withdrawal.as_ref().expect("pending");
    assert_eq!((withdrawal.amount, withdrawal.finalize_after), (100, initiated_at + DELAY));
    assert_eq!(
        (unknown_state.balance, unknown_state.total_claimed, unknown_state.refund_nonce, &unknown_state.withdrawal),
        (0, 0, 0, &None)
    );
    // The same as one call per channel.
    for (id, state) in ids.iter().zip(&states) {
        assert_eq!(decode_state(&call(state_calldata(*id)).await, DELAY).unwrap(), *state);
    }
    // An answer for another number of channels is refused, not misread.
    let two = call(states_calldata(&ids[..2])).await;
    assert!(decode_states(&two, &[DELAY; 3]).is_err());
    assert!(decode_state(&two, DELAY).is_err());
    assert_eq!(decode_states(&call(states_calldata(&[])).await, &[]).unwrap(), Vec::new());
}
