//! Signatures a token checks on chain: a signer with code (a contract
//! wallet, an EIP-7702 delegated EOA) approves a digest through ERC-1271
//! `isValidSignature`, and a wallet not yet deployed wraps its signature in
//! ERC-6492 with the factory call that deploys it.
//!
//! Checks run in one `eth_call` of the [`X402SignatureProbe`] code, placed
//! at [`PROBE_ADDRESS`] by a state override ([`crate::Chain::probe`]): each
//! check alone, with its own gas allowance, its effects undone, so that a
//! hostile wallet can neither starve the others nor leave them a wallet
//! deployed. A payment's check is the token's own
//! `transferWithAuthorization`, run as its settlement will run it (after
//! the factory call of a counterfactual wallet); a voucher's is the
//! signer's `isValidSignature`, by STATICCALL as the channel contract makes
//! it.
//!
//! [`X402SignatureProbe`]: crate::contracts::X402SignatureProbe

use alloy::{
    primitives::{Address, B256, Bytes},
    sol,
    sol_types::{SolCall, SolValue},
};

use crate::{batch::RowResult, contracts::X402SignatureProbe};

/// Where the probe's code is placed for its `eth_call`: an address no one
/// holds a key to, holding nothing.
pub const PROBE_ADDRESS: Address = alloy::primitives::address!("0x00000000000000000000000000000000000402d1");

/// One check for the probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// A counterfactual wallet's deployment, made first (it must succeed).
    pub deploy: Option<Erc6492>,
    /// The contract called.
    pub target: Address,
    /// The call.
    pub data: Bytes,
    /// By STATICCALL (a verifying contract's `isValidSignature` call).
    pub is_static: bool,
}

/// How a probe ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probed {
    /// The call returned this.
    Returned(Bytes),
    /// The call reverted with this.
    Reverted(Bytes),
    /// The factory call failed with this.
    FactoryFailed(Bytes),
    /// The check used up its gas allowance.
    OutOfGas,
    /// Not run: the `eth_call` had too little gas left. Ask again.
    NotRun,
}

/// The input of the probe's `probe(probes, gasPerProbe)`.
pub fn probe_calldata(probes: &[Probe], gas_per_probe: u64) -> Bytes {
    let probes = probes
        .iter()
        .map(|p| X402SignatureProbe::Probe {
            factory: p.deploy.as_ref().map_or(Address::ZERO, |d| d.factory),
            factoryCalldata: p.deploy.as_ref().map(|d| d.calldata.clone()).unwrap_or_default(),
            target: p.target,
            data: p.data.clone(),
            isStatic: p.is_static,
        })
        .collect();
    X402SignatureProbe::probeCall { probes, gasPerProbe: alloy::primitives::U256::from(gas_per_probe) }
        .abi_encode()
        .into()
}

/// The probe's `codeSizes(accounts)`: whether each holds code now.
pub fn code_sizes_calldata(accounts: &[Address]) -> Bytes {
    X402SignatureProbe::codeSizesCall { accounts: accounts.to_vec() }.abi_encode().into()
}

/// Whether each account of [`code_sizes_calldata`] holds code.
pub fn decode_code_sizes(output: &[u8]) -> crate::Result<Vec<bool>> {
    let sizes = X402SignatureProbe::codeSizesCall::abi_decode_returns(output)
        .map_err(|e| crate::Error::Decode(format!("the probe's codeSizes returned something else: {e}")))?;
    Ok(sizes.into_iter().map(|size| !size.is_zero()).collect())
}

/// The outcomes of [`probe_calldata`]'s probes, in order.
pub fn decode_probes(output: &[u8]) -> crate::Result<Vec<Probed>> {
    let ret = X402SignatureProbe::probeCall::abi_decode_returns(output)
        .map_err(|e| crate::Error::Decode(format!("the signature probe returned something else: {e}")))?;
    if ret.outcomes.len() != ret.data.len() {
        return Err(crate::Error::Decode("the signature probe's outcomes and data differ in length".into()));
    }
    ret.outcomes
        .into_iter()
        .zip(ret.data)
        // `X402SignatureProbe.Outcome`, in its order.
        .map(|(outcome, data)| {
            Ok(match outcome {
                0 => Probed::Returned(data),
                1 => Probed::Reverted(data),
                2 => Probed::FactoryFailed(data),
                3 => Probed::OutOfGas,
                4 => Probed::NotRun,
                other => return Err(crate::Error::Decode(format!("the signature probe answered outcome {other}"))),
            })
        })
        .collect()
}

/// The ERC-1271 magic value: `isValidSignature.selector`.
pub const ERC1271_MAGIC: [u8; 4] = [0x16, 0x26, 0xba, 0x7e];

/// An ERC-6492 signature ends with these 32 bytes.
pub const ERC6492_MAGIC: [u8; 32] =
    alloy::primitives::hex!("6492649264926492649264926492649264926492649264926492649264926492");

sol! {
    /// ERC-1271.
    interface IErc1271 {
        function isValidSignature(bytes32 hash, bytes signature) external view returns (bytes4 magicValue);
    }
}

/// An ERC-6492 signature, unwrapped: the wallet is deployed by calling
/// `factory` with `calldata`, then checks `signature`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Erc6492 {
    /// The factory that deploys the wallet.
    pub factory: Address,
    /// The call of `factory` that deploys it.
    pub calldata: Bytes,
    /// The wallet's own signature, as it checks it once deployed.
    pub signature: Bytes,
}

impl Erc6492 {
    /// `signature` unwrapped, if it ends with [`ERC6492_MAGIC`]; `Err` when
    /// it does but the rest is not `abi.encode(address, bytes, bytes)`.
    pub fn unwrap(signature: &[u8]) -> Option<Result<Self, String>> {
        let body = signature.strip_suffix(&ERC6492_MAGIC)?;
        Some(
            <(Address, Bytes, Bytes)>::abi_decode_params(body)
                .map(|(factory, calldata, signature)| Self { factory, calldata, signature })
                .map_err(|e| format!("the ERC-6492 wrapper does not decode as (address, bytes, bytes): {e}")),
        )
    }

    /// `signature` wrapped for a wallet `factory` deploys with `calldata`.
    pub fn wrap(&self) -> Bytes {
        let mut out = (self.factory, self.calldata.clone(), self.signature.clone()).abi_encode_params();
        out.extend_from_slice(&ERC6492_MAGIC);
        out.into()
    }

    /// The `aggregate3` row deploying the wallet.
    pub fn deploy_row(&self) -> (Address, Bytes) {
        (self.factory, self.calldata.clone())
    }
}

/// The `aggregate3` row asking `signer` whether it approves `signature` of
/// `digest`.
pub fn is_valid_signature_row(signer: Address, digest: B256, signature: Bytes) -> (Address, Bytes) {
    (signer, IErc1271::isValidSignatureCall { hash: digest, signature }.abi_encode().into())
}

/// What a check row's result says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The signer answered the magic value.
    Valid,
    /// The signer answered something else (or nothing: no code).
    Invalid(String),
    /// The call reverted: a refusal, or a row starved of gas by the rows
    /// before it; only a row checked alone tells.
    Reverted(String),
}

/// The verdict of [`is_valid_signature_row`]'s result `row` for `signer`.
pub fn verdict(signer: Address, row: &RowResult) -> Verdict {
    if !row.success {
        let why = row.revert_message().unwrap_or_else(|| format!("revert data 0x{}", alloy::hex::encode(&row.data)));
        return Verdict::Reverted(format!("isValidSignature of {signer} reverted: {why}"));
    }
    // A bytes4 comes back left-aligned in a 32-byte word, its padding zero:
    // the token decodes the first word with `abi.decode(ret, (bytes4))`,
    // which refuses dirty padding.
    match row.data.get(..32) {
        Some(word) if word[..4] == ERC1271_MAGIC && word[4..].iter().all(|b| *b == 0) => Verdict::Valid,
        Some(word) => Verdict::Invalid(format!(
            "isValidSignature of {signer} answered 0x{}, not the ERC-1271 magic value",
            alloy::hex::encode(word)
        )),
        None if row.data.is_empty() => {
            Verdict::Invalid(format!("{signer} holds no code that answers isValidSignature"))
        }
        None => Verdict::Invalid(format!(
            "isValidSignature of {signer} answered 0x{}, not a 32-byte word",
            alloy::hex::encode(&row.data)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erc6492_round_trips_and_plain_signatures_are_not_wrapped() {
        let wrapped = Erc6492 {
            factory: Address::repeat_byte(7),
            calldata: Bytes::from(vec![1, 2, 3]),
            signature: Bytes::from(vec![9; 65]),
        };
        assert_eq!(Erc6492::unwrap(&wrapped.wrap()), Some(Ok(wrapped)));
        assert_eq!(Erc6492::unwrap(&[0u8; 65]), None);
        let mut garbage = vec![0xffu8; 40];
        garbage.extend_from_slice(&ERC6492_MAGIC);
        assert!(Erc6492::unwrap(&garbage).unwrap().is_err());
    }

    #[test]
    fn only_the_magic_word_is_valid() {
        let signer = Address::repeat_byte(1);
        let word = |b: [u8; 4]| alloy::primitives::FixedBytes(b).abi_encode().into();
        assert_eq!(verdict(signer, &RowResult { success: true, data: word(ERC1271_MAGIC) }), Verdict::Valid);
        assert!(matches!(verdict(signer, &RowResult { success: true, data: word([0xff; 4]) }), Verdict::Invalid(_)));
        // An EOA answers nothing.
        assert!(
            matches!(verdict(signer, &RowResult { success: true, data: Bytes::new() }), Verdict::Invalid(m) if m.contains("no code"))
        );
        // Dirty padding is refused by the token's abi.decode.
        let mut dirty = word(ERC1271_MAGIC).to_vec();
        dirty[31] = 1;
        assert!(matches!(verdict(signer, &RowResult { success: true, data: dirty.into() }), Verdict::Invalid(_)));
        // Four bare bytes are not a word.
        assert!(matches!(
            verdict(signer, &RowResult { success: true, data: ERC1271_MAGIC.into() }),
            Verdict::Invalid(_)
        ));
        assert!(matches!(verdict(signer, &RowResult { success: false, data: Bytes::new() }), Verdict::Reverted(_)));
    }
}
