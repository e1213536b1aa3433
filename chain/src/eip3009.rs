//! EIP-3009 `transferWithAuthorization`: the typed data a payer signs for an
//! x402 `exact` payment, and the token functions that settle it.

// The generated contract bindings mirror the token's 9-argument functions.
#![allow(clippy::too_many_arguments)]

use alloy::{
    primitives::{Address, B256, Bytes, U256, keccak256},
    sol,
    sol_types::{Eip712Domain, SolCall, SolStruct},
};

sol! {
    /// The EIP-712 struct a payer signs (EIP-3009).
    #[derive(Debug, PartialEq, Eq)]
    struct TransferWithAuthorization {
        address from;
        address to;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
    }

    /// The EIP-712 struct a payer signs for a transfer only the payee may
    /// execute (EIP-3009); channel deposits use it, made out to the deposit
    /// collector.
    #[derive(Debug, PartialEq, Eq)]
    struct ReceiveWithAuthorization {
        address from;
        address to;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
    }

    /// The EIP-712 struct a payer signs to cancel an unused authorization.
    #[derive(Debug, PartialEq, Eq)]
    struct CancelAuthorization {
        address authorizer;
        bytes32 nonce;
    }

    /// The EIP-3009 surface of a USDC-like token that settlement uses.
    #[derive(Debug)]
    #[sol(rpc)]
    #[allow(missing_debug_implementations)]
    interface IEip3009 {
        event AuthorizationUsed(address indexed authorizer, bytes32 indexed nonce);
        event AuthorizationCanceled(address indexed authorizer, bytes32 indexed nonce);
        event Transfer(address indexed from, address indexed to, uint256 value);

        function transferWithAuthorization(
            address from,
            address to,
            uint256 value,
            uint256 validAfter,
            uint256 validBefore,
            bytes32 nonce,
            uint8 v,
            bytes32 r,
            bytes32 s
        ) external;

        function cancelAuthorization(address authorizer, bytes32 nonce, uint8 v, bytes32 r, bytes32 s) external;

        function authorizationState(address authorizer, bytes32 nonce) external view returns (bool);

        function balanceOf(address account) external view returns (uint256);
    }

    /// FiatToken 2.2's `bytes signature` overloads: the signature goes to
    /// the token as given, and a signer with code checks it (ERC-1271).
    #[derive(Debug)]
    #[allow(missing_debug_implementations)]
    interface IEip3009Bytes {
        function transferWithAuthorization(
            address from,
            address to,
            uint256 value,
            uint256 validAfter,
            uint256 validBefore,
            bytes32 nonce,
            bytes signature
        ) external;
    }
}

impl From<&x402_wire::Authorization> for TransferWithAuthorization {
    /// The EIP-712 message the payer of `a` signed and the token checks.
    fn from(a: &x402_wire::Authorization) -> Self {
        Self {
            from: a.from,
            to: a.to,
            value: a.value,
            validAfter: a.valid_after,
            validBefore: a.valid_before,
            nonce: a.nonce,
        }
    }
}

/// `(v, r, s)` of a 65-byte `r ‖ s ‖ v` signature, `v` as 27/28.
fn split_signature(signature: &[u8; 65]) -> (u8, B256, B256) {
    let v = if matches!(signature[64], 0 | 27) { 27 } else { 28 };
    (v, B256::from_slice(&signature[..32]), B256::from_slice(&signature[32..64]))
}

/// Calldata of `cancelAuthorization(authorizer, nonce, v, r, s)` for a
/// [`CancelAuthorization`] signed with the 65-byte `signature`.
pub fn cancel_authorization_calldata(authorizer: Address, nonce: B256, signature: &[u8; 65]) -> Bytes {
    let (v, r, s) = split_signature(signature);
    IEip3009::cancelAuthorizationCall { authorizer, nonce, v, r, s }.abi_encode().into()
}

/// Calldata of `transferWithAuthorization(from, to, value, validAfter,
/// validBefore, nonce, v, r, s)` for `message` signed with the 65-byte
/// `r ‖ s ‖ v` `signature` (`v` as 27/28 or 0/1).
pub fn transfer_with_authorization_calldata(message: &TransferWithAuthorization, signature: &[u8; 65]) -> Bytes {
    let (v, r, s) = split_signature(signature);
    IEip3009::transferWithAuthorizationCall {
        from: message.from,
        to: message.to,
        value: message.value,
        validAfter: message.validAfter,
        validBefore: message.validBefore,
        nonce: message.nonce,
        v,
        r,
        s,
    }
    .abi_encode()
    .into()
}

/// Calldata of the `bytes signature` overload of
/// `transferWithAuthorization` for `message` with `signature` as it is:
/// what a payer with code signed, checked by its ERC-1271
/// `isValidSignature` (FiatToken 2.2; older tokens lack the overload).
pub fn transfer_with_authorization_bytes_calldata(message: &TransferWithAuthorization, signature: Bytes) -> Bytes {
    IEip3009Bytes::transferWithAuthorizationCall {
        from: message.from,
        to: message.to,
        value: message.value,
        validAfter: message.validAfter,
        validBefore: message.validBefore,
        nonce: message.nonce,
        signature,
    }
    .abi_encode()
    .into()
}

/// A token's EIP-712 domain with its separator computed once.
///
/// Hashing the domain costs as much as hashing the message; verifiers keep
/// one of these per (chain, token, name, version) and reuse it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eip3009Domain {
    separator: B256,
}

impl Eip3009Domain {
    /// The domain `{name, version, chainId, verifyingContract: token}`.
    pub fn new(name: &str, version: &str, chain_id: u64, token: Address) -> Self {
        let domain = Eip712Domain::new(
            Some(name.to_owned().into()),
            Some(version.to_owned().into()),
            Some(U256::from(chain_id)),
            Some(token),
            None,
        );
        Self { separator: domain.separator() }
    }

    /// The domain separator.
    pub const fn separator(&self) -> B256 {
        self.separator
    }

    /// The EIP-712 digest of `message` in this domain (for a payment, what
    /// the payer signed): `keccak256(0x1901 || domainSeparator || hashStruct(message))`.
    pub fn signing_hash<T: SolStruct>(&self, message: &T) -> B256 {
        let mut buf = [0u8; 66];
        buf[0] = 0x19;
        buf[1] = 0x01;
        buf[2..34].copy_from_slice(self.separator.as_slice());
        buf[34..].copy_from_slice(message.eip712_hash_struct().as_slice());
        keccak256(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::{address, b256};

    /// `anvil_eip3009` in `shared/x402/vectors.json`.
    #[test]
    fn anvil_vector_digest() {
        let domain = Eip3009Domain::new("USD Coin", "2", 31337, address!("0x5FbDB2315678afecb367f032d93F642f64180aa3"));
        assert_eq!(domain.separator(), b256!("0xfc557a58e1177dd0b729c40130003009d1ffed5a502b494889e2711c7726dd52"));
        let message = TransferWithAuthorization {
            from: address!("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"),
            to: address!("0x70997970C51812dc3A010C7d01b50e0d17dc79C8"),
            value: U256::from(10_000),
            validAfter: U256::ZERO,
            validBefore: U256::from(1_999_999_999u64),
            nonce: B256::repeat_byte(0x11),
        };
        assert_eq!(
            message.eip712_hash_struct(),
            b256!("0x5a879879e110caae0de5bf507091d2816f15e95f8eb89e07e2cecc8eac8ab204")
        );
        assert_eq!(
            domain.signing_hash(&message),
            b256!("0xd93f977ef4729e23e1750880476907e01c90f0c7c02d4a7610678f539dff31db")
        );
    }

    /// `spec_example_eip3009` in `shared/x402/vectors.json`: the domain of
    /// USDC on Base Sepolia.
    #[test]
    fn spec_vector_domain() {
        let domain = Eip3009Domain::new("USDC", "2", 84532, address!("0x036CbD53842c5426634e7929541eC2318f3dCF7e"));
        assert_eq!(domain.separator(), b256!("0x71f17a3b2ff373b803d70a5a07c046c1a2bc8e89c09ef722fcb047abe94c9818"));
    }
}
