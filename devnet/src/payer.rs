//! Signing x402 `exact` payments and `batch-settlement` vouchers and
//! deposits as a payer would: for tests, benchmarks,
//! the load generator and demos.

use alloy::primitives::Bytes;
use alloy::sol_types::SolStruct;
use alloy::{
    primitives::{Address, B256, U256},
    signers::{SignerSync, local::PrivateKeySigner},
};
use x402_chain::{CancelAuthorization, Eip3009Domain, ReceiveWithAuthorization, TransferWithAuthorization};
use x402_channel::{ChannelConfig, ChannelDomain, Voucher};

use x402_wire::{Authorization, DepositPayload, ExactPayload, Network, Requirements};

/// A payer key that signs EIP-3009 authorizations.
#[derive(Clone, Debug)]
pub struct Payer {
    signer: PrivateKeySigner,
}

impl Payer {
    /// A payer signing with `signer`.
    pub const fn new(signer: PrivateKeySigner) -> Self {
        Self { signer }
    }

    /// A fresh random key.
    pub fn random() -> Self {
        Self::new(PrivateKeySigner::random())
    }

    /// The key, to send transactions as the payer.
    pub const fn signer(&self) -> &PrivateKeySigner {
        &self.signer
    }

    /// The payer's address.
    pub fn address(&self) -> Address {
        self.signer.address()
    }

    /// Signs a payment of exactly what `requirements` ask, valid from
    /// `valid_after` until `valid_before`, with `nonce`.
    pub fn sign_exact(
        &self,
        requirements: &Requirements,
        valid_after: u64,
        valid_before: u64,
        nonce: B256,
    ) -> ExactPayload {
        self.sign_exact_from(self.address(), requirements, valid_after, valid_before, nonce)
    }

    /// [`Payer::sign_exact`] for a payment from `from`: a contract wallet
    /// this key owns, which approves the key's signatures (ERC-1271).
    pub fn sign_exact_from(
        &self,
        from: Address,
        requirements: &Requirements,
        valid_after: u64,
        valid_before: u64,
        nonce: B256,
    ) -> ExactPayload {
        let authorization = Authorization {
            from,
            to: requirements.pay_to,
            value: requirements.amount,
            valid_after: U256::from(valid_after),
            valid_before: U256::from(valid_before),
            nonce,
        };
        let signature = self.sign_authorization(requirements, &authorization);
        ExactPayload { network: requirements.network.clone(), authorization, signature }
    }

    /// Signs `authorization` in the token domain `requirements` name. The
    /// network must be `eip155:<chain id>`.
    pub fn sign_authorization(&self, requirements: &Requirements, authorization: &Authorization) -> Vec<u8> {
        self.sign_typed(requirements, &TransferWithAuthorization::from(authorization)).to_vec()
    }

    /// Signs an EIP-3009 `CancelAuthorization` of this payer's `nonce` in
    /// the token domain `requirements` name.
    pub fn sign_cancel(&self, requirements: &Requirements, nonce: B256) -> [u8; 65] {
        self.sign_typed(requirements, &CancelAuthorization { authorizer: self.address(), nonce })
    }

    /// Signs a `batch-settlement` voucher for `channel_id` up to `max_claimable`.
    pub fn sign_voucher(&self, domain: &ChannelDomain, channel_id: B256, max_claimable: u128) -> Bytes {
        let digest = domain.voucher_digest(&Voucher { channelId: channel_id, maxClaimableAmount: max_claimable });
        Bytes::copy_from_slice(&self.signer.sign_hash_sync(&digest).expect("local keys always sign").as_bytes())
    }

    /// A channel config of this payer (its own authorizer) paying `receiver`.
    pub fn channel_config(
        &self,
        receiver: Address,
        receiver_authorizer: Address,
        token: Address,
        withdraw_delay: u64,
        salt: B256,
    ) -> ChannelConfig {
        ChannelConfig {
            payer: self.address(),
            payerAuthorizer: self.address(),
            receiver,
            receiverAuthorizer: receiver_authorizer,
            token,
            withdrawDelay: alloy::primitives::aliases::U40::from(withdraw_delay),
            salt,
        }
    }

    /// A deposit of `amount` into `channel_id`: this payer's ERC-3009
    /// `ReceiveWithAuthorization` to `collector`, in the token domain
    /// `requirements` name, valid until `valid_before`.
    pub fn sign_deposit(
        &self,
        requirements: &Requirements,
        collector: Address,
        channel_id: B256,
        amount: u128,
        valid_before: u64,
        salt: U256,
    ) -> DepositPayload {
        let message = ReceiveWithAuthorization {
            from: self.address(),
            to: collector,
            value: U256::from(amount),
            validAfter: U256::ZERO,
            validBefore: U256::from(valid_before),
            nonce: x402_chain::channel::deposit_nonce(channel_id, salt),
        };
        let signature = self.sign_typed(requirements, &message);
        DepositPayload { amount, valid_after: 0, valid_before, salt, signature: Bytes::copy_from_slice(&signature) }
    }

    fn sign_typed<T: SolStruct>(&self, requirements: &Requirements, message: &T) -> [u8; 65] {
        let chain_id = Network::parse(&requirements.network).map_or(0, |n| n.chain_id());
        let domain =
            Eip3009Domain::new(&requirements.eip712_name, &requirements.eip712_version, chain_id, requirements.asset);
        let digest = domain.signing_hash(message);
        self.signer.sign_hash_sync(&digest).expect("local keys always sign").as_bytes()
    }
}
