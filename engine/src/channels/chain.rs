//! [`ChannelSource`] on a [`Chain`]: channel reads and deposits, off the
//! shard threads.

use std::sync::Arc;

use alloy::primitives::B256;
use x402_chain::{Chain, Follow, follow_sent, send_new};
use x402_channel::OnChain;

use super::{
    ChannelNotifier, ChannelSource, DepositFailure, DepositNotifier, NoChannels, ReadFailure, VerifiedDeposit,
    VerifiedVoucher, voucher_signer,
};
use crate::Error;

/// Reads channels through a [`Chain`] with one `eth_call` each.
#[derive(Debug)]
pub struct ChainChannels<C> {
    chain: Arc<C>,
    /// How deposit transactions are followed to their receipts.
    follow: Follow,
    runtime: tokio::runtime::Handle,
}

impl<C: Chain> ChainChannels<C> {
    /// Must be called inside a tokio runtime, where the reads will run.
    pub fn new(chain: Arc<C>, follow: Follow) -> Self {
        Self { chain, follow, runtime: tokio::runtime::Handle::current() }
    }
}

impl<C: Chain> ChannelSource for ChainChannels<C> {
    fn fetch(&self, v: &VerifiedVoucher, notify: ChannelNotifier) {
        if v.chain_id != self.chain.chain_id() {
            return NoChannels.fetch(v, notify);
        }
        let (chain, id, contract) = (self.chain.clone(), v.channel_id, v.contract);
        let (withdraw_delay, signer) = (v.config.withdrawDelay.to::<u64>(), voucher_signer(&v.config));
        // A voucher proved on chain has a contract signer, which the
        // contract checks as x402d did; one recovered locally is refused if
        // its signer holds code (an EIP-7702 delegated EOA, which the
        // contract would ask instead of recovering).
        let proved = v.proved;
        self.runtime.spawn(async move {
            let (read, code) =
                futures::future::join(chain.call(contract, x402_chain::channel::state_calldata(id)), async {
                    if proved { Ok(false) } else { chain.has_code(signer).await }
                })
                .await;
            let unavailable = |e: x402_chain::Error| ReadFailure::Unavailable(Arc::new(Error::from(e)));
            let fetched = match code {
                Ok(true) => Err(ReadFailure::SignerHasCode(signer)),
                Ok(false) => {
                    read.and_then(|out| x402_chain::channel::decode_state(&out, withdraw_delay)).map_err(unavailable)
                }
                Err(e) => Err(unavailable(e)),
            };
            if let Err(ReadFailure::Unavailable(e)) = &fetched {
                tracing::warn!(channel = %id, error = %e, "reading a channel's state failed");
            }
            notify(id, fetched);
        });
    }

    fn deposit(&self, v: &VerifiedVoucher, notify: DepositNotifier) {
        if v.chain_id != self.chain.chain_id() {
            return NoChannels.deposit(v, notify);
        }
        let Some(d) = v.deposit.clone() else { return };
        let (chain, v, follow) = (self.chain.clone(), v.clone(), self.follow);
        self.runtime.spawn(async move {
            let outcome = put_deposit(&*chain, &v, &d, follow).await.map(|(_, onchain)| onchain);
            if let Err(e) = &outcome {
                tracing::warn!(channel = %v.channel_id, error = ?e, "a channel deposit failed");
            }
            notify(v.channel_id, outcome);
        });
    }
}

/// Sends the deposit (simulated first) and waits for its receipt, then
/// reads the channel. An authorization already spent means the deposit
/// landed before (a retried request): only the read is done.
/// Returns the deposit transaction (none when it had landed before) and the
/// channel after it.
pub(crate) async fn put_deposit<C: Chain>(
    chain: &C,
    v: &VerifiedVoucher,
    d: &VerifiedDeposit,
    follow: Follow,
) -> Result<(Option<B256>, OnChain), DepositFailure> {
    let unavailable = |e: x402_chain::Error| DepositFailure::Unavailable(Arc::new(Error::from(e)));
    // Nothing goes on chain for vouchers that would then be refused.
    let signer = voucher_signer(&v.config);
    if !v.proved && chain.has_code(signer).await.map_err(unavailable)? {
        return Err(DepositFailure::Rejected(ReadFailure::signer_has_code(signer)));
    }
    let spent = chain.authorization_state(v.config.token, v.config.payer, d.nonce).await.map_err(unavailable)?;
    let mut sent = None;
    if !spent {
        let input = x402_chain::channel::deposit_calldata(&v.config, d.amount, d.collector, d.collector_data.clone());
        if let Some(revert) = chain.simulate(v.contract, input.clone()).await.map_err(unavailable)? {
            return Err(DepositFailure::Rejected(format!("the deposit would revert: {revert}")));
        }
        let gas = chain.estimate_gas(v.contract, input.clone()).await.map_err(unavailable)?;
        let tx = chain.sign_call(v.contract, input, Some(gas)).await.map_err(unavailable)?;
        let hash = tx.hash;
        tracing::info!(channel = %v.channel_id, tx = %hash, amount = d.amount, "sending a channel deposit");
        crash_point!("deposit::signed");
        send_new(chain, &tx).await.map_err(unavailable)?;
        crash_point!("deposit::broadcast");
        match follow_sent(chain, tx, follow).await.map_err(unavailable)? {
            Some(receipt) if receipt.success => {
                crash_point!("deposit::mined");
                sent = Some(receipt.tx);
            }
            Some(receipt) => {
                return Err(DepositFailure::Rejected(format!("the deposit transaction {} reverted", receipt.tx)));
            }
            None => {
                let e = Error::Timeout(format!("deposit transaction {hash} not mined in {:?}", follow.timeout));
                return Err(DepositFailure::Unavailable(Arc::new(e)));
            }
        }
    }
    let out = chain.call(v.contract, x402_chain::channel::state_calldata(v.channel_id)).await.map_err(unavailable)?;
    let onchain = x402_chain::channel::decode_state(&out, v.config.withdrawDelay.to::<u64>()).map_err(unavailable)?;
    Ok((sent, onchain))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use alloy::primitives::{Address, Bytes};
    use x402_chain::{Chain, Follow, send_and_follow};

    use crate::testing::ScriptedChain;

    const FOLLOW: Follow =
        Follow { stuck_after: Duration::from_millis(20), max_bumps: 2, timeout: Duration::from_millis(500) };

    async fn signed(chain: &ScriptedChain) -> x402_chain::SignedTx {
        chain.sign_call(Address::repeat_byte(1), Bytes::from_static(b"call"), None).await.unwrap()
    }

    /// A node that could not be reached for the first broadcast is asked
    /// again: the transaction is mined, not given up with its nonce unsent.
    #[tokio::test]
    async fn a_broadcast_that_failed_once_is_sent_again() {
        let chain = ScriptedChain::new();
        chain.auto_mine(true);
        chain.fail_broadcasts(1);
        let tx = signed(&chain).await;
        let receipt = send_and_follow(&chain, tx.clone(), FOLLOW).await.unwrap().expect("mined");
        assert_eq!(receipt.tx, tx.hash);
    }

    /// A transaction the node keeps refusing is an error, and its nonce is
    /// filled: the signer's later transactions do not wait behind a gap.
    #[tokio::test]
    async fn a_transaction_never_sent_leaves_no_nonce_gap() {
        let chain = ScriptedChain::new();
        chain.refuse_broadcasts(100);
        let tx = signed(&chain).await;
        assert!(send_and_follow(&chain, tx.clone(), FOLLOW).await.is_err());
        assert!(chain.nonce_taken(tx.nonce), "the unsent nonce was filled");
    }

    /// A transaction sent but never mined (dropped from the pool, every
    /// replacement too) ends in `None`, and its nonce is filled.
    #[tokio::test]
    async fn a_transaction_never_mined_leaves_no_nonce_gap() {
        let chain = ScriptedChain::new();
        let tx = signed(&chain).await;
        assert!(send_and_follow(&chain, tx.clone(), FOLLOW).await.unwrap().is_none());
        assert!(chain.nonce_taken(tx.nonce), "the unmined nonce was filled");
    }
}
