//! Many calls in one transaction through Multicall3's `aggregate3`, each
//! with `allowFailure = true`: one failing row (a front-run nonce, a
//! drained balance, a cancelled authorization) fails alone, never the batch.

use alloy::{
    primitives::{Address, Bytes, U256},
    sol_types::{SolCall, SolError, SolValue},
};

use crate::{
    Error, Result,
    contracts::Multicall3::{self, Call3},
    eip3009::IEip3009,
};

/// Calldata of `aggregate3` over `(target, calldata)` rows, each allowed
/// to fail.
pub fn aggregate3_calldata(rows: impl IntoIterator<Item = (Address, Bytes)>) -> Bytes {
    let calls = rows
        .into_iter()
        .map(|(target, call_data)| Call3 { target, allowFailure: true, callData: call_data })
        .collect::<Vec<_>>();
    Multicall3::aggregate3Call { calls }.abi_encode().into()
}

/// Calldata of `aggregate3` over `(target, calldata, allow_failure)` rows:
/// a row not allowed to fail reverts the whole call when it fails.
pub fn aggregate3_calldata_with(rows: impl IntoIterator<Item = (Address, Bytes, bool)>) -> Bytes {
    let calls = rows
        .into_iter()
        .map(|(target, call_data, allow_failure)| Call3 { target, allowFailure: allow_failure, callData: call_data })
        .collect::<Vec<_>>();
    Multicall3::aggregate3Call { calls }.abi_encode().into()
}

/// One row's result in an `aggregate3` return.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowResult {
    /// Whether the row's call succeeded.
    pub success: bool,
    /// The call's return data, or its revert data.
    pub data: Bytes,
}

impl RowResult {
    /// The revert message of a failed row (`Error(string)`), if it has one.
    pub fn revert_message(&self) -> Option<String> {
        if self.success {
            return None;
        }
        alloy::sol_types::Revert::abi_decode(&self.data).ok().map(|r| r.reason)
    }
}

/// Decodes the output of an `aggregate3` call.
pub fn decode_aggregate3(output: &[u8]) -> Result<Vec<RowResult>> {
    let results = Multicall3::aggregate3Call::abi_decode_returns(output)
        .map_err(|e| Error::Decode(format!("aggregate3 returned something else: {e}")))?;
    Ok(results.into_iter().map(|r| RowResult { success: r.success, data: r.returnData }).collect())
}

/// `aggregate3` rows reading `token.balanceOf(owner)` for each owner.
pub fn balance_of_rows(token: Address, owners: &[Address]) -> Vec<(Address, Bytes)> {
    owners.iter().map(|owner| (token, IEip3009::balanceOfCall { account: *owner }.abi_encode().into())).collect()
}

/// Decodes the rows of [`balance_of_rows`]; a failed row reads as zero.
pub fn decode_balances(results: &[RowResult]) -> Vec<U256> {
    results.iter().map(|r| if r.success { U256::abi_decode(&r.data).unwrap_or_default() } else { U256::ZERO }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_and_reverts_decode() {
        let calldata = aggregate3_calldata([(Address::repeat_byte(1), Bytes::from_static(&[1, 2, 3]))]);
        let decoded = Multicall3::aggregate3Call::abi_decode(&calldata).unwrap();
        assert_eq!(decoded.calls.len(), 1);
        assert!(decoded.calls[0].allowFailure);

        let revert = alloy::sol_types::Revert::from("FiatTokenV2: authorization is used or canceled");
        let failed = RowResult { success: false, data: revert.abi_encode().into() };
        assert_eq!(failed.revert_message().as_deref(), Some("FiatTokenV2: authorization is used or canceled"));
        let ok = RowResult { success: true, data: U256::from(7).abi_encode().into() };
        assert_eq!(ok.revert_message(), None);
        assert_eq!(decode_balances(&[ok, failed]), vec![U256::from(7), U256::ZERO]);
    }
}
