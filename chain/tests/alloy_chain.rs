//! `AlloyChain` against a real anvil: nonces, a signer pool, resyncs,
//! dropped and stuck transactions.

use std::time::Duration;

use alloy::{
    network::TransactionBuilder,
    primitives::{Address, B256, Bytes, U256},
    providers::{Provider, ProviderBuilder, ext::AnvilApi},
    rpc::types::TransactionRequest,
    signers::{SignerSync, local::PrivateKeySigner},
};
use x402_chain::{
    AlloyChain, Chain, Eip3009Domain, Error, Follow, SignedTx, TransferLog, TransferWithAuthorization, TxConfig,
    send_and_follow,
};
use x402_devnet::{Anvil, DEV_TOKEN_NAME, DEV_TOKEN_VERSION};

struct Setup {
    anvil: Anvil,
    token: Address,
    payer: PrivateKeySigner,
    pay_to: Address,
}

async fn setup() -> Setup {
    let anvil = Anvil::spawn(&[]).unwrap();
    let payer = PrivateKeySigner::random();
    let devnet = x402_devnet::deploy(anvil.endpoint(), &[payer.address()], U256::from(1_000_000_000u64)).await.unwrap();
    Setup { anvil, token: devnet.token, payer, pay_to: Address::repeat_byte(0x77) }
}

/// Random signer keys with ether from anvil.
async fn funded_signers(endpoint: &str, n: usize) -> Vec<PrivateKeySigner> {
    let provider = ProviderBuilder::new().connect_http(endpoint.parse().unwrap());
    let mut signers = Vec::new();
    for _ in 0..n {
        let signer = PrivateKeySigner::random();
        provider.anvil_set_balance(signer.address(), U256::from(10u128.pow(20))).await.unwrap();
        signers.push(signer);
    }
    signers
}

/// Calldata of `transferWithAuthorization` for a fresh authorization.
fn authorization_call(s: &Setup, value: u64, nonce: B256) -> Bytes {
    let message = TransferWithAuthorization {
        from: s.payer.address(),
        to: s.pay_to,
        value: U256::from(value),
        validAfter: U256::ZERO,
        validBefore: U256::from(u64::MAX),
        nonce,
    };
    let digest = Eip3009Domain::new(DEV_TOKEN_NAME, DEV_TOKEN_VERSION, 31337, s.token).signing_hash(&message);
    let sig = s.payer.sign_hash_sync(&digest).unwrap();
    x402_chain::eip3009::transfer_with_authorization_calldata(&message, &sig.as_bytes())
}

/// A nonce signed for but never sent is filled, and the signer's later
/// transactions are mined instead of waiting behind the gap; a restart
/// floors the next nonce past recorded intents.
#[tokio::test]
async fn an_unsent_nonce_is_filled_and_a_floor_holds() {
    let s = setup().await;
    let signers = funded_signers(s.anvil.endpoint(), 1).await;
    let chain = AlloyChain::connect(s.anvil.endpoint(), signers, TxConfig::default()).await.unwrap();
    let unsent = chain.sign_call(s.token, authorization_call(&s, 100, B256::repeat_byte(1)), None).await.unwrap();
    let next = chain.sign_call(s.token, authorization_call(&s, 100, B256::repeat_byte(2)), None).await.unwrap();
    assert_eq!((unsent.nonce, next.nonce), (0, 1));
    chain.broadcast(&next).await.unwrap();
    assert!(chain.wait_receipt(&[next.hash], Duration::from_secs(1)).await.unwrap().is_none(), "behind a gap");
    chain.fill_nonce(&unsent).await.unwrap();
    let receipt = chain.wait_receipt(&[next.hash], Duration::from_secs(20)).await.unwrap().expect("mined");
    assert!(receipt.success);

    chain.floor_nonce(unsent.signer, 7).await.unwrap();
    let after = chain.sign_call(s.token, authorization_call(&s, 100, B256::repeat_byte(3)), None).await.unwrap();
    assert_eq!(after.nonce, 7);
    chain.floor_nonce(unsent.signer, 3).await.unwrap();
    let later = chain.sign_call(s.token, authorization_call(&s, 100, B256::repeat_byte(4)), None).await.unwrap();
    assert_eq!(later.nonce, 8, "a floor never lowers the next nonce");
}

/// What a process stopped between signing and sending leaves: nonce 0
/// never sent, a recorded transaction at 1 waiting behind it. The gaps
/// below the recorded nonces are filled, the recorded ones left alone.
#[tokio::test]
async fn the_gaps_below_recorded_nonces_are_filled() {
    let s = setup().await;
    let signers = funded_signers(s.anvil.endpoint(), 1).await;
    let chain = AlloyChain::connect(s.anvil.endpoint(), signers, TxConfig::default()).await.unwrap();
    let txs = [1, 2, 3, 4].map(|n| authorization_call(&s, 100, B256::repeat_byte(n)));
    let mut signed = Vec::new();
    for input in txs {
        signed.push(chain.sign_call(s.token, input, None).await.unwrap());
    }
    // Nonces 1 and 3 were recorded and sent; 0 and 2 never were.
    chain.broadcast(&signed[1]).await.unwrap();
    chain.broadcast(&signed[3]).await.unwrap();
    assert!(chain.wait_receipt(&[signed[1].hash], Duration::from_secs(1)).await.unwrap().is_none(), "behind a gap");
    let signer = signed[0].signer;
    assert_eq!(chain.fill_gaps(signer, 4, &[1, 3]).await.unwrap(), 2);
    for tx in [&signed[1], &signed[3]] {
        let receipt = chain.wait_receipt(&[tx.hash], Duration::from_secs(20)).await.unwrap().expect("mined");
        assert!(receipt.success);
    }
    assert_eq!(chain.fill_gaps(signer, 4, &[1, 3]).await.unwrap(), 0, "nothing left to fill");
}

#[tokio::test]
async fn settles_authorizations_through_a_signer_pool() {
    let s = setup().await;
    let signers = funded_signers(s.anvil.endpoint(), 3).await;
    let chain = AlloyChain::connect(s.anvil.endpoint(), signers, TxConfig::default()).await.unwrap();
    assert_eq!(chain.chain_id(), 31337);

    let mut sent = Vec::new();
    for i in 0..30u8 {
        let tx = chain.sign_call(s.token, authorization_call(&s, 100, B256::repeat_byte(i)), None).await.unwrap();
        chain.broadcast(&tx).await.unwrap();
        // Sending the same bytes again (a rebroadcast after a crash) is harmless.
        chain.broadcast(&tx).await.unwrap();
        sent.push(tx);
    }
    for tx in &sent {
        let receipt = chain.wait_receipt(&[tx.hash], Duration::from_secs(20)).await.unwrap().expect("mined");
        assert!(receipt.success, "{tx:?}");
        assert!(receipt.used(
            s.token,
            s.payer.address(),
            B256::repeat_byte(sent.iter().position(|t| t == tx).unwrap() as u8)
        ));
    }
    assert_eq!(chain.token_balance(s.token, s.pay_to).await.unwrap(), U256::from(3000));
    for i in 0..30u8 {
        assert!(chain.authorization_state(s.token, s.payer.address(), B256::repeat_byte(i)).await.unwrap());
    }
    // Each signer's nonces are consecutive from 0: no gaps, no reuse.
    for signer in chain.signers() {
        let mut nonces: Vec<_> = sent.iter().filter(|t| t.signer == signer).map(|t| t.nonce).collect();
        nonces.sort_unstable();
        assert_eq!(nonces, (0..10).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn a_nonce_used_elsewhere_is_resynced() {
    let s = setup().await;
    let signer = funded_signers(s.anvil.endpoint(), 1).await.remove(0);
    let chain = AlloyChain::connect(s.anvil.endpoint(), vec![signer.clone()], TxConfig::default()).await.unwrap();
    let first = chain.sign_call(s.token, authorization_call(&s, 1, B256::repeat_byte(1)), None).await.unwrap();
    chain.broadcast(&first).await.unwrap();
    chain.wait_receipt(&[first.hash], Duration::from_secs(20)).await.unwrap().expect("mined");

    // The same key sends a transaction behind the manager's back.
    let other = ProviderBuilder::new().wallet(signer).connect_http(s.anvil.endpoint().parse().unwrap());
    let tx = TransactionRequest::default().with_to(Address::repeat_byte(9)).with_value(U256::from(1));
    other.send_transaction(tx).await.unwrap().get_receipt().await.unwrap();

    let stale = chain.sign_call(s.token, authorization_call(&s, 1, B256::repeat_byte(2)), None).await.unwrap();
    assert_eq!(stale.nonce, 1);
    let err = chain.broadcast(&stale).await.unwrap_err();
    assert!(matches!(err, Error::NonceTooLow { nonce: 1, .. }), "{err}");
    assert!(err.is_retryable());
    let fresh = chain.sign_call(s.token, authorization_call(&s, 1, B256::repeat_byte(2)), None).await.unwrap();
    assert_eq!(fresh.nonce, 2);
    chain.broadcast(&fresh).await.unwrap();
    let receipt = chain.wait_receipt(&[fresh.hash], Duration::from_secs(20)).await.unwrap().expect("mined");
    assert!(receipt.success);
}

#[tokio::test]
async fn transactions_the_node_dropped_are_replaced() {
    use std::sync::Arc;
    let s = setup().await;
    let signer = funded_signers(s.anvil.endpoint(), 1).await.remove(0);
    let chain = Arc::new(AlloyChain::connect(s.anvil.endpoint(), vec![signer], TxConfig::default()).await.unwrap());
    let control = ProviderBuilder::new().connect_http(s.anvil.endpoint().parse().unwrap());
    control.anvil_set_auto_mine(false).await.unwrap();
    let follow = Follow { stuck_after: Duration::from_secs(1), max_bumps: 3, timeout: Duration::from_secs(30) };
    let mut sent = Vec::new();
    let mut followed = Vec::new();
    for (value, nonce) in [(1, 1), (2, 2)] {
        let tx = chain.sign_call(s.token, authorization_call(&s, value, B256::repeat_byte(nonce)), None).await.unwrap();
        sent.push(tx.clone());
        let chain = chain.clone();
        followed.push(tokio::spawn(async move { send_and_follow(&*chain, tx, follow).await }));
    }
    assert_eq!((sent[0].nonce, sent[1].nonce), (0, 1));
    // Once it has both, the node forgets the first, and with it the
    // second, which depends on its nonce: anvil does this to a
    // transaction that did not fit a full block.
    for tx in &sent {
        while control.get_transaction_by_hash(tx.hash).await.unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    control.anvil_drop_transaction(sent[0].hash).await.unwrap();
    for tx in &sent {
        assert!(control.get_transaction_by_hash(tx.hash).await.unwrap().is_none(), "{} still known", tx.hash);
    }
    control.anvil_set_interval_mining(1).await.unwrap();

    for ((tx, followed), (value, nonce)) in sent.iter().zip(followed).zip([(1, 1), (2, 2)]) {
        let receipt = followed.await.unwrap().unwrap().expect("mined");
        assert_ne!(receipt.tx, tx.hash, "a dropped version cannot be mined");
        assert!(receipt.success && receipt.used(s.token, s.payer.address(), B256::repeat_byte(nonce)), "{value}");
    }
    assert_eq!(chain.token_balance(s.token, s.pay_to).await.unwrap(), U256::from(3));
}

#[tokio::test]
async fn a_stuck_transaction_is_replaced_by_a_fee_bump() {
    let s = setup().await;
    let signer = funded_signers(s.anvil.endpoint(), 1).await.remove(0);
    let chain = AlloyChain::connect(s.anvil.endpoint(), vec![signer], TxConfig::default()).await.unwrap();
    let control = ProviderBuilder::new().connect_http(s.anvil.endpoint().parse().unwrap());
    control.anvil_set_auto_mine(false).await.unwrap();

    let stuck = chain.sign_call(s.token, authorization_call(&s, 5, B256::repeat_byte(1)), None).await.unwrap();
    chain.broadcast(&stuck).await.unwrap();
    let bumped = chain.bump(&stuck).await.unwrap();
    assert_eq!((bumped.signer, bumped.nonce, bumped.to, bumped.gas_limit), (stuck.signer, 0, s.token, stuck.gas_limit));
    assert!(bumped.max_fee_per_gas > stuck.max_fee_per_gas * 11 / 10);
    assert!(bumped.max_priority_fee_per_gas > stuck.max_priority_fee_per_gas * 11 / 10);
    assert_ne!(bumped.hash, stuck.hash);
    assert_eq!(SignedTx::from_raw(bumped.raw.clone(), bumped.signer).unwrap(), bumped);
    // The node takes the replacement into its pool in place of the original.
    chain.broadcast(&bumped).await.unwrap();
    control.anvil_mine(Some(2), None).await.unwrap();

    let receipt = chain.wait_receipt(&[stuck.hash, bumped.hash], Duration::from_secs(5)).await.unwrap().unwrap();
    assert_eq!(receipt.tx, bumped.hash);
    assert!(receipt.success && receipt.used(s.token, s.payer.address(), B256::repeat_byte(1)));
    assert_eq!(chain.receipt(stuck.hash).await.unwrap(), None);
    assert_eq!(chain.receipt(bumped.hash).await.unwrap().unwrap().confirmations, 2);
    assert_eq!(chain.block_hash(receipt.block).await.unwrap(), Some(receipt.block_hash));
    assert_eq!(chain.token_balance(s.token, s.pay_to).await.unwrap(), U256::from(5));
    let logs = chain.transfer_logs(s.token, receipt.block, receipt.block).await.unwrap();
    assert_eq!(
        logs,
        vec![TransferLog { block: receipt.block, from: s.payer.address(), to: s.pay_to, value: U256::from(5) }]
    );
}
