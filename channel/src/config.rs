//! Channel configuration, channel id and voucher digests.

use std::sync::OnceLock;

use alloy::{
    primitives::{Address, B256, Keccak256, U256, keccak256},
    sol,
    sol_types::{Eip712Domain, SolStruct},
};

sol! {
    /// The immutable terms of a channel; its EIP-712 digest is the channel id.
    #[derive(Debug, PartialEq, Eq)]
    struct ChannelConfig {
        address payer;
        address payerAuthorizer;
        address receiver;
        address receiverAuthorizer;
        address token;
        uint40 withdrawDelay;
        bytes32 salt;
    }

    /// A cumulative voucher: the receiver may claim up to `maxClaimableAmount`
    /// from the channel in total.
    #[derive(Debug, PartialEq, Eq)]
    struct Voucher {
        bytes32 channelId;
        uint128 maxClaimableAmount;
    }

    /// A cooperative refund of up to `amount` at the channel's refund
    /// `nonce`, signed by the receiver authorizer.
    #[derive(Debug, PartialEq, Eq)]
    struct Refund {
        bytes32 channelId;
        uint256 nonce;
        uint128 amount;
    }

    /// One row of a claim batch: the channel's claimed total becomes
    /// `totalClaimed`, under a voucher for `maxClaimableAmount`.
    #[derive(Debug, PartialEq, Eq)]
    struct ClaimEntry {
        bytes32 channelId;
        uint128 maxClaimableAmount;
        uint128 totalClaimed;
    }

    /// The rows of one `claimWithSignature`, signed together by their shared
    /// receiver authorizer.
    #[derive(Debug, PartialEq, Eq)]
    struct ClaimBatch {
        ClaimEntry[] claims;
    }
}

/// The EIP-712 domain of one deployed channel contract, its separator
/// computed once: every voucher needs two digests in it (the channel id and
/// the voucher's), and hashing the domain and the type strings each time
/// would cost more than the digests themselves.
#[derive(Debug, Clone)]
pub struct ChannelDomain {
    domain: Eip712Domain,
    separator: B256,
}

/// Type hashes of the per-voucher structs, computed once.
static CONFIG_TYPE_HASH: OnceLock<B256> = OnceLock::new();
static VOUCHER_TYPE_HASH: OnceLock<B256> = OnceLock::new();

/// `hashStruct` of a flat struct (no nested struct types) whose type hash
/// is cached in `type_hash`.
fn hash_flat_struct<T: SolStruct>(type_hash: &OnceLock<B256>, value: &T) -> B256 {
    let type_hash = type_hash.get_or_init(|| keccak256(T::eip712_encode_type().as_bytes()));
    let mut hasher = Keccak256::new();
    hasher.update(type_hash);
    hasher.update(value.eip712_encode_data());
    hasher.finalize()
}

impl ChannelDomain {
    /// EIP-712 domain name of the `batch-settlement` contract.
    pub const NAME: &'static str = "x402 Batch Settlement";
    /// EIP-712 domain version of the `batch-settlement` contract.
    pub const VERSION: &'static str = "1";

    /// The domain of the contract at `contract` on `chain_id`.
    pub fn new(chain_id: u64, contract: Address) -> Self {
        let domain = Eip712Domain::new(
            Some(Self::NAME.into()),
            Some(Self::VERSION.into()),
            Some(U256::from(chain_id)),
            Some(contract),
            None,
        );
        let separator = domain.separator();
        Self { domain, separator }
    }

    /// `keccak256(0x1901 ‖ domainSeparator ‖ struct_hash)`.
    fn digest(&self, struct_hash: B256) -> B256 {
        let mut buf = [0u8; 66];
        buf[..2].copy_from_slice(&[0x19, 0x01]);
        buf[2..34].copy_from_slice(self.separator.as_slice());
        buf[34..].copy_from_slice(struct_hash.as_slice());
        keccak256(buf)
    }

    /// The channel id: the EIP-712 digest of the config, domain included.
    pub fn channel_id(&self, config: &ChannelConfig) -> B256 {
        self.digest(hash_flat_struct(&CONFIG_TYPE_HASH, config))
    }

    /// The digest the payer's authorizer signs for a voucher.
    pub fn voucher_digest(&self, voucher: &Voucher) -> B256 {
        self.digest(hash_flat_struct(&VOUCHER_TYPE_HASH, voucher))
    }

    /// The digest the receiver authorizer signs for a refund.
    pub fn refund_digest(&self, refund: &Refund) -> B256 {
        self.digest(refund.eip712_hash_struct())
    }

    /// The digest the receiver authorizer signs for a batch of claims.
    pub fn claim_batch_digest(&self, batch: &ClaimBatch) -> B256 {
        self.digest(batch.eip712_hash_struct())
    }

    /// The EIP-712 domain.
    pub fn domain(&self) -> &Eip712Domain {
        &self.domain
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::{address, aliases::U40, b256};

    /// `batch_settlement` in `shared/x402/vectors.json`.
    #[test]
    fn vector_channel_id_and_voucher_digest() {
        let domain = ChannelDomain::new(84532, address!("0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003"));
        let config = ChannelConfig {
            payer: address!("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"),
            payerAuthorizer: address!("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"),
            receiver: address!("0x70997970C51812dc3A010C7d01b50e0d17dc79C8"),
            receiverAuthorizer: address!("0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"),
            token: address!("0x036CbD53842c5426634e7929541eC2318f3dCF7e"),
            withdrawDelay: U40::from(900),
            salt: B256::ZERO,
        };
        let id = domain.channel_id(&config);
        assert_eq!(id, b256!("0x29ccd7626a1289e60f2284c95763b20cf4a944f591a4f613133e6cf22eb9196d"));
        let voucher = Voucher { channelId: id, maxClaimableAmount: 5000 };
        assert_eq!(
            domain.voucher_digest(&voucher),
            b256!("0x13a53a592689cfe97daf1169e2fb957a9694c5ecb9c648f1797b724c72786a28")
        );
        // The cached separator and type hashes give what alloy computes in full.
        assert_eq!(id, config.eip712_signing_hash(domain.domain()));
        assert_eq!(domain.voucher_digest(&voucher), voucher.eip712_signing_hash(domain.domain()));
        let refund = Refund { channelId: id, amount: 7, nonce: U256::from(3) };
        assert_eq!(domain.refund_digest(&refund), refund.eip712_signing_hash(domain.domain()));
    }
}
