//! Signing x402 `exact` payments as a payer would: for tests, benchmarks,
//! the load generator and demos.

use alloy::sol_types::SolStruct;
use alloy::{
    primitives::{Address, B256, U256},
    signers::{SignerSync, local::PrivateKeySigner},
};
use x402_chain::{CancelAuthorization, Eip3009Domain};

use crate::domain::{Authorization, ExactPayload, Requirements};

/// A payer key that signs EIP-3009 authorizations.
#[derive(Clone, Debug)]
pub struct Payer {
    signer: PrivateKeySigner,
}

impl Payer {
    pub const fn new(signer: PrivateKeySigner) -> Self {
        Self { signer }
    }

    /// A fresh random key.
    pub fn random() -> Self {
        Self::new(PrivateKeySigner::random())
    }

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
        let authorization = Authorization {
            from: self.address(),
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
        self.sign_typed(requirements, &authorization.message()).to_vec()
    }

    /// Signs an EIP-3009 `CancelAuthorization` of this payer's `nonce` in
    /// the token domain `requirements` name.
    pub fn sign_cancel(&self, requirements: &Requirements, nonce: B256) -> [u8; 65] {
        self.sign_typed(requirements, &CancelAuthorization { authorizer: self.address(), nonce })
    }

    fn sign_typed<T: SolStruct>(&self, requirements: &Requirements, message: &T) -> [u8; 65] {
        let chain_id = crate::domain::Network::parse(&requirements.network).map_or(0, |n| n.chain_id());
        let domain =
            Eip3009Domain::new(&requirements.eip712_name, &requirements.eip712_version, chain_id, requirements.asset);
        let digest = domain.signing_hash(message);
        self.signer.sign_hash_sync(&digest).expect("local keys always sign").as_bytes()
    }
}
