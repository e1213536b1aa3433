//! secp256k1 signatures as x402 payloads carry them: 65 bytes `r ‖ s ‖ v`.
//!
//! `(r, s)` is the ECDSA signature. It must have `s` in the lower half of
//! the group order: tokens and the channel contract refuse the other half,
//! which would make every signature malleable. `v` (27/28, or 0/1) is the
//! parity of the signature's nonce point; it only tells recovery which of
//! two public keys to return.
//!
//! - An `exact` payment goes on chain as signed, so its `v` must be right:
//!   [`recover_signer`] uses it as given.
//! - A voucher is valid when `(r, s)` verifies against its channel's signer
//!   key. Once a verifier thread knows that key, it checks later vouchers
//!   with [`Signature::verify`], an ECDSA verification, instead of
//!   recovering a key from each: no square root, no inversion and no Keccak
//!   of the key, about 15% less work per voucher. Such a check cannot see
//!   `v`, so x402d derives `v` when it puts a voucher on chain
//!   ([`claimable`]).

use alloy::primitives::{Address, B256, U256, keccak256};
use secp256k1::{
    Message, PublicKey, SECP256K1,
    ecdsa::{RecoverableSignature, RecoveryId},
};

/// Half the secp256k1 group order: the largest `s` a canonical (low-s)
/// signature may have. USDC rejects anything above it.
const SECP256K1_HALF_ORDER: U256 =
    U256::from_be_bytes(alloy::primitives::hex!("7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0"));

/// A 65-byte signature whose form is checked: low `s`, `v` one of 0, 1, 27,
/// 28, `r` and `s` in range.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Signature {
    recoverable: RecoverableSignature,
}

impl Signature {
    /// Checks the form of `r ‖ s ‖ v`.
    pub(crate) fn parse(signature: &[u8; 65]) -> Result<Self, String> {
        let s = U256::from_be_slice(&signature[32..64]);
        if s > SECP256K1_HALF_ORDER {
            return Err("signature s is above half the curve order (malleable); tokens reject it".into());
        }
        let parity = match signature[64] {
            0 | 27 => 0,
            1 | 28 => 1,
            v => return Err(format!("signature v is {v}, not 27/28 or 0/1")),
        };
        let recid = RecoveryId::try_from(parity).expect("0 or 1");
        let recoverable = RecoverableSignature::from_compact(&signature[..64], recid)
            .map_err(|_| "signature r or s is out of range".to_owned())?;
        Ok(Self { recoverable })
    }

    /// The public key that signed `digest`, as `v` says.
    pub(crate) fn recover(&self, digest: B256) -> Result<PublicKey, String> {
        SECP256K1
            .recover_ecdsa(Message::from_digest(digest.0), &self.recoverable)
            .map_err(|_| "signature does not recover to a public key".to_owned())
    }

    /// The key of `signer` if it signed `digest`, whichever `v` that takes.
    /// `Err` says whom it recovers to as given.
    pub(crate) fn recover_as(&self, digest: B256, signer: Address) -> Result<PublicKey, String> {
        self.signed_by(digest, signer).map(|(_, key)| key)
    }

    /// This `(r, s)` with the `v` under which it recovers to `signer`, and
    /// `signer`'s key. `Err` says whom it recovers to as given.
    fn signed_by(&self, digest: B256, signer: Address) -> Result<(Self, PublicKey), String> {
        let key = self.recover(digest)?;
        if address_of(&key) == signer {
            return Ok((*self, key));
        }
        let flipped = self.flipped();
        if let Ok(other) = flipped.recover(digest)
            && address_of(&other) == signer
        {
            return Ok((flipped, other));
        }
        Err(format!("signed by {}, not {signer}", address_of(&key)))
    }

    /// Whether `(r, s)` is `key`'s signature of `digest` (`v` not looked at).
    pub(crate) fn verify(&self, digest: B256, key: &PublicKey) -> bool {
        SECP256K1.verify_ecdsa(Message::from_digest(digest.0), &self.recoverable.to_standard(), key).is_ok()
    }

    /// The same `(r, s)` with the other `v`.
    fn flipped(&self) -> Self {
        let (recid, compact) = self.recoverable.serialize_compact();
        let other = if i32::from(recid) == 0 { RecoveryId::One } else { RecoveryId::Zero };
        Self { recoverable: RecoverableSignature::from_compact(&compact, other).expect("parsed before") }
    }

    /// `r ‖ s ‖ v` with `v` 27 or 28, as `ecrecover` takes it.
    fn to_rsv(self) -> [u8; 65] {
        let (recid, compact) = self.recoverable.serialize_compact();
        let mut out = [0u8; 65];
        out[..64].copy_from_slice(&compact);
        out[64] = 27 + u8::try_from(i32::from(recid)).expect("0 or 1");
        out
    }
}

/// The Ethereum address of `key`.
pub(crate) fn address_of(key: &PublicKey) -> Address {
    let uncompressed = key.serialize_uncompressed();
    Address::from_slice(&keccak256(&uncompressed[1..])[12..])
}

/// Recovers the address that signed `digest` with a 65-byte `r ‖ s ‖ v`
/// signature, `v` as given, refusing high-`s` (malleable) signatures.
pub fn recover_signer(signature: &[u8; 65], digest: B256) -> Result<Address, String> {
    Signature::parse(signature)?.recover(digest).map(|key| address_of(&key))
}

/// `signature` as the chain takes it: `v` 27 or 28, the one under which it
/// recovers to `signer`. `None` if it is not `signer`'s signature of
/// `digest` under either.
pub(crate) fn claimable(signature: &[u8], digest: B256, signer: Address) -> Option<[u8; 65]> {
    let (signed, _) = Signature::parse(signature.try_into().ok()?).ok()?.signed_by(digest, signer).ok()?;
    Some(signed.to_rsv())
}

/// A voucher's signature as a claim sends it: [`claimable`] when it is
/// `signer`'s (ECDSA), else as it is, for the contract to ask the signer's
/// code (ERC-1271). A proof asks the chain about these very bytes.
pub(crate) fn as_claimed(signature: &[u8], digest: B256, signer: Address) -> alloy::primitives::Bytes {
    match claimable(signature, digest, signer) {
        Some(signature) => alloy::primitives::Bytes::copy_from_slice(&signature),
        None => alloy::primitives::Bytes::copy_from_slice(signature),
    }
}

#[cfg(test)]
mod tests {
    use alloy::signers::{SignerSync, local::PrivateKeySigner};

    use super::*;

    fn signed(digest: B256) -> (PrivateKeySigner, [u8; 65]) {
        let signer = PrivateKeySigner::random();
        let signature = signer.sign_hash_sync(&digest).unwrap().as_bytes();
        (signer, signature)
    }

    fn with_v(mut signature: [u8; 65], v: u8) -> [u8; 65] {
        signature[64] = v;
        signature
    }

    #[test]
    fn verifying_against_the_key_ignores_v_and_recovering_does_not() {
        let digest = keccak256(b"voucher");
        let (signer, signature) = signed(digest);
        let parsed = Signature::parse(&signature).unwrap();
        let key = parsed.recover(digest).unwrap();
        assert_eq!(address_of(&key), signer.address());
        assert!(parsed.verify(digest, &key));
        assert!(!parsed.verify(keccak256(b"another voucher"), &key));

        // The other parity is the same ECDSA signature: the key verifies
        // it, recovery as given finds someone else, `recover_as` the signer.
        let wrong_v = with_v(signature, if signature[64] == 27 { 28 } else { 27 });
        let flipped = Signature::parse(&wrong_v).unwrap();
        assert!(flipped.verify(digest, &key));
        assert_ne!(recover_signer(&wrong_v, digest).unwrap(), signer.address());
        assert_eq!(flipped.recover_as(digest, signer.address()).unwrap(), key);
        let stranger = Address::repeat_byte(7);
        assert!(flipped.recover_as(digest, stranger).unwrap_err().contains(&stranger.to_string()));
        let (_, other) = signed(digest);
        assert!(!Signature::parse(&other).unwrap().verify(digest, &key), "another key's signature");
    }

    #[test]
    fn claimable_signatures_carry_the_v_that_recovers_the_signer() {
        let digest = keccak256(b"voucher");
        let (signer, signature) = signed(digest);
        let right = signature[64];
        assert!(right == 27 || right == 28);
        let wrong = 55 - right;
        for given in [right, wrong, right - 27, wrong - 27] {
            let fixed = claimable(&with_v(signature, given), digest, signer.address()).unwrap();
            assert_eq!(fixed, signature, "v {given}");
        }
        assert_eq!(claimable(&signature, digest, Address::repeat_byte(1)), None);
        assert_eq!(claimable(&signature, keccak256(b"other"), signer.address()), None);
        assert_eq!(claimable(&signature[..64], digest, signer.address()), None);
        assert_eq!(claimable(&with_v(signature, 29), digest, signer.address()), None);
    }

    #[test]
    fn malformed_signatures_are_refused_with_the_reason() {
        let (_, signature) = signed(keccak256(b"x"));
        assert!(Signature::parse(&with_v(signature, 2)).unwrap_err().contains("v is 2"));
        let mut high_s = signature;
        high_s[32] = 0xff;
        assert!(Signature::parse(&high_s).unwrap_err().contains("half the curve order"));
        let mut zero_r = signature;
        zero_r[..32].fill(0);
        assert!(Signature::parse(&zero_r).and_then(|s| s.recover(keccak256(b"x"))).is_err());
    }
}
